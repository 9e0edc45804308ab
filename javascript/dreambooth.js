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

    // A page opened (or reloaded) while a job runs fills its form with that job's settings:
    // once, the first time the tab is shown (the server answers from the process's runner).
    var restored = false;

    function restoreOnce() {
        if (restored) {
            return;
        }
        var holder = find("dreambooth_restore");
        var button = holder && (holder.tagName === "BUTTON" ? holder : holder.querySelector("button"));
        if (button) {
            restored = true;
            button.click();
        }
    }

    // Right after Train (or any action) the page polls fast at once, not at the idle pace: a
    // short run would otherwise be over before the page first sees it running.
    var fastUntil = 0;
    document.addEventListener("click", function (event) {
        var target = event.target;
        var inTab = target && target.closest && target.closest("#tab_dreambooth");
        if (inTab && target.closest("button") && !target.closest("#dreambooth_poll")) {
            fastUntil = Date.now() + 10000;
            lastClick = 0;
        }
    }, true);

    function tick() {
        noticeTick();
        if (document.hidden || !tabVisible()) {
            return;
        }
        restoreOnce();
        var now = Date.now();
        var fast = running() || now < fastUntil;
        if (now - lastClick < (fast ? FAST_MS : SLOW_MS) - 50) {
            return;
        }
        var button = pollButton();
        if (button) {
            lastClick = now;
            button.click();
        }
    }

    // While training holds the WebUI's generation lock, a notice at the top of txt2img and
    // img2img says why their requests wait: the WebUI's own bar can only say "In queue". Asked
    // from our API every few seconds, only while one of those tabs is on screen.
    var NOTICE_MS = 3000;
    var lastNotice = 0;

    function shown(element) {
        return !!element && (element.offsetParent !== null || element.style.display === "block");
    }

    function clock(seconds) {
        var s = Math.max(0, Math.round(seconds));
        var m = Math.floor(s / 60);
        return m + ":" + ("0" + (s % 60)).slice(-2);
    }

    function showNotice(status) {
        ["txt2img", "img2img"].forEach(function (name) {
            var tab = find("tab_" + name);
            if (!tab) {
                return;
            }
            var notice = find("dreambooth_notice_" + name);
            var holds = status && status.running && status.holds_generation;
            if (!holds) {
                if (notice) {
                    notice.style.display = "none";
                }
                return;
            }
            if (!notice) {
                notice = document.createElement("div");
                notice.id = "dreambooth_notice_" + name;
                notice.className = "dreambooth-webui-notice";
                tab.insertBefore(notice, tab.firstChild);
            }
            var text = "DreamBooth training holds generation: a request made now waits until it " +
                "ends (" + status.phase + (status.total ? " " + status.step + "/" + status.total : "");
            if (status.eta_seconds !== null && status.eta_seconds !== undefined) {
                text += ", ETA " + clock(status.eta_seconds);
            }
            notice.textContent = text + ").";
            notice.style.display = "block";
        });
    }

    function noticeTick() {
        if (document.hidden || !(shown(find("tab_txt2img")) || shown(find("tab_img2img")))) {
            return;
        }
        var now = Date.now();
        if (now - lastNotice < NOTICE_MS - 50 || typeof fetch !== "function") {
            return;
        }
        lastNotice = now;
        fetch("./dreambooth/v1/status", {credentials: "same-origin"}).then(function (response) {
            return response.ok ? response.json() : null; // --api-auth without a login: no notice
        }).then(showNotice, function () {
            showNotice(null);
        });
    }

    setInterval(tick, FAST_MS);

    // "Load in txt2img": the server has already made the new checkpoint the active one (in its
    // own thread, never under the WebUI's queue lock); here the page's checkpoint dropdown is
    // set to the same checkpoint and the txt2img tab shown, with the WebUI's own globals.
    //
    // The dropdown gets its choices only when the page loads and from its own refresh button,
    // so it does not know a file written since. Gradio 4 (Forge) shows a value that is not
    // among the choices as a blank field; gradio 3 (A1111) shows the text, but its list lacks
    // the file. So the page's list is refreshed first (Forge: #forge_refresh_checkpoint, A1111:
    // the quicksettings' #refresh_sd_model_checkpoint), then the checkpoint is selected, and
    // the field is watched until it shows the new checkpoint (gradio 4.40 redraws it when the
    // new choices arrive after the value); if it does not, refresh and select are sent once or
    // twice more. Neither gradio puts a dropdown's choices in the page until it is opened, so
    // what is checked is what the user sees: the field's text.
    var SETTLE_MS = 600; // the refresh's round trip (a rescan of the models folder) first
    var WATCH_MS = 10000;
    var RETRY_MS = 3000;
    var CHECK_MS = 250;
    var loadToken = 0;

    function refreshButton() {
        var button = find("forge_refresh_checkpoint") || find("refresh_sd_model_checkpoint");
        if (button && button.tagName !== "BUTTON") {
            button = button.querySelector("button") || button;
        }
        return button;
    }

    function checkpointField() {
        var root = app();
        return root.querySelector("#setting_sd_model_checkpoint input") ||
            root.querySelector(".model_selection input") ||
            root.querySelector("#quicksettings input[aria-label='Checkpoint']");
    }

    // "sub/model.safetensors [abcdef1234]" -> full name and short name, without the hash
    function names(text) {
        var full = String(text || "").replace(/\s*\[[^\]]*\]\s*$/, "").trim();
        var base = full.split(/[\\/]/).pop().replace(/\.(safetensors|ckpt|gguf)$/i, "");
        return {full: full, base: base};
    }

    function fieldShows(field, title) {
        if (!field || !field.value) {
            return false;
        }
        var shown = names(field.value);
        var wanted = names(title);
        return shown.full === wanted.full || (shown.full === shown.base && shown.base === wanted.base);
    }

    function select(title) {
        if (typeof selectCheckpoint === "function") {
            selectCheckpoint(title);
        }
    }

    window.dreamboothLoadInTxt2img = function (title) {
        if (!title) {
            return;
        }
        var token = ++loadToken;
        var refresh = refreshButton();
        if (refresh) {
            refresh.click();
        }
        setTimeout(function () {
            if (token !== loadToken) {
                return; // a newer request took over
            }
            select(title);
            if (typeof switch_to_txt2img === "function") {
                switch_to_txt2img();
            }
            if (!refresh || !checkpointField()) {
                return; // not the WebUI's page (or an unknown layout): nothing to watch
            }
            var started = Date.now();
            var lastTry = started;
            var timer = setInterval(function () {
                var now = Date.now();
                if (token !== loadToken || fieldShows(checkpointField(), title)) {
                    clearInterval(timer);
                    return;
                }
                if (now - started > WATCH_MS) {
                    clearInterval(timer);
                    if (window.console) {
                        console.warn("DreamBooth: the checkpoint list does not show " + title +
                            "; press its refresh button");
                    }
                    return;
                }
                if (now - lastTry > RETRY_MS) {
                    lastTry = now;
                    refresh.click();
                    setTimeout(function () {
                        if (token === loadToken && !fieldShows(checkpointField(), title)) {
                            select(title);
                        }
                    }, SETTLE_MS);
                }
            }, CHECK_MS);
        }, refresh ? SETTLE_MS : 0);
    };

    // "Use in txt2img" for a LoRA: the server has rescanned the WebUI's Lora list; here the
    // tag (<lora:NAME:1>) goes into the txt2img prompt — once: a prompt that already applies
    // this LoRA, at any weight, is left as it is, so a second click adds nothing —, the Lora
    // cards are refreshed with the WebUI's own hidden button (A1111 1.7+ and Forge:
    // #txt2img_lora_extra_refresh_internal; older A1111: #txt2img_extra_refresh), and the
    // txt2img tab is shown.
    var PROMPT_TRIES = 20;
    var PROMPT_MS = 100;

    function promptBox() {
        return app().querySelector("#txt2img_prompt textarea");
    }

    function loraName(tag) {
        var found = /^<lora:([^:>]+)/.exec(String(tag || ""));
        return found ? found[1] : null;
    }

    function appliesLora(text, name) {
        var escaped = name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
        return new RegExp("<lora:" + escaped + "(:[^>]*)?>").test(String(text || ""));
    }

    function addToPrompt(box, tag, name) {
        if (appliesLora(box.value, name)) {
            return;
        }
        var separator = (typeof opts !== "undefined" && opts && opts.extra_networks_add_text_separator) || " ";
        var text = box.value.replace(/\s+$/, "");
        box.value = text ? text + separator + tag : tag;
        // what the WebUI's updateInput() sends: gradio takes the new value from it
        box.dispatchEvent(new Event("input", {bubbles: true}));
    }

    function refreshLoraCards() {
        var holder = find("txt2img_lora_extra_refresh_internal") || find("txt2img_extra_refresh");
        if (!holder) {
            return;
        }
        var button = holder.tagName === "BUTTON" ? holder : (holder.querySelector("button") || holder);
        button.dispatchEvent(new Event("click"));
    }

    window.dreamboothUseLora = function (tag) {
        var name = loraName(tag);
        if (!name) {
            return;
        }
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        }
        refreshLoraCards();
        var tries = 0;
        (function put() {
            var box = promptBox();
            if (box) {
                addToPrompt(box, tag, name);
            } else if (++tries < PROMPT_TRIES) {
                setTimeout(put, PROMPT_MS);
            } else if (window.console) {
                console.warn("DreamBooth: no txt2img prompt on this page; add " + tag + " yourself");
            }
        })();
    };
})();
