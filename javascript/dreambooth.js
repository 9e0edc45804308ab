// DreamBooth tab: browser-side helpers. The WebUI injects every javascript/*.js into its page.
// Placeholder: progress polling and "Load in txt2img" (selectCheckpoint + switch_to_txt2img)
// arrive with the tab. Keep to the WebUI's globals: gradioApp(), onUiLoaded(), onUiUpdate().
onUiLoaded(function () {
    // nothing yet
});
