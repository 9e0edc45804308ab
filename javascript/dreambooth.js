// DreamBooth tab: browser-side helpers. The WebUI injects every javascript/*.js into its page;
// the standalone app (python -m dreambooth ui) runs this file once on load.
//
// Polling: the server holds the state of the run (the job runner), the page only shows it. Every
// second while our tab is visible (every 4 s when nothing runs) we click the hidden
// #dreambooth_poll button; its event is registered with queue=False, so it is answered at once
// and never waits behind a generation in gradio's queue. Several browser tabs each poll the same
// state; a reloaded page picks the running job up at its first poll. No gr.Timer (gradio 3.41
// has none).
(function () {
    if (window.dreamboothPolling) {
        return; // injected twice (Reload UI keeps the page's globals): one interval is enough
    }
    window.dreamboothPolling = true;

    var FAST_MS = 1000;
    var SLOW_MS = 4000;
    var lastClick = 0;

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function find(id) {
        var root = app();
        return (root.getElementById ? root.getElementById(id) : null) || root.querySelector("#" + id);
    }

    function tabVisible() {
        var tab = find("tab_dreambooth");
        if (!tab) {
            return false;
        }
        return tab.offsetParent !== null || tab.style.display === "block";
    }

    function running() {
        var line = find("dreambooth_status_line");
        return line ? line.getAttribute("data-running") === "1" : false;
    }

    function pollButton() {
        var holder = find("dreambooth_poll");
        if (!holder) {
            return null;
        }
        // gradio 3 puts the elem_id on the <button>, gradio 4 on the button too; be safe.
        return holder.tagName === "BUTTON" ? holder : holder.querySelector("button");
    }

    function tick() {
        if (document.hidden || !tabVisible()) {
            return;
        }
        var now = Date.now();
        if (now - lastClick < (running() ? FAST_MS : SLOW_MS) - 50) {
            return;
        }
        var button = pollButton();
        if (button) {
            lastClick = now;
            button.click();
        }
    }

    setInterval(tick, FAST_MS);

    // "Load in txt2img": the server has already made the new checkpoint the active one (in its
    // own thread, never under the WebUI's queue lock); here the page's checkpoint dropdown is
    // set to the same title and the txt2img tab shown, with the WebUI's own globals.
    window.dreamboothLoadInTxt2img = function (title) {
        if (!title) {
            return;
        }
        if (typeof selectCheckpoint === "function") {
            selectCheckpoint(title);
        }
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        }
    };
})();
