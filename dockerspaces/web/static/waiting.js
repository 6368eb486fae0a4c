// dockerspaces waiting page: poll /monitor:progress/<token>, go to the app when ready.
(function () {
  "use strict";
  var box = document.getElementById("ds-wait");
  var token = box.getAttribute("data-token");
  var target = box.getAttribute("data-url");
  var stateEl = document.getElementById("ds-state");
  var detailEl = document.getElementById("ds-detail");
  var bar = document.getElementById("ds-bar");
  var waitedEl = document.getElementById("ds-waited");
  var retry = document.getElementById("ds-retry");
  var misses = 0, done = false;

  function mb(n) { return (n / 1048576).toFixed(1) + " MB"; }

  function go() {
    if (done) { return; }
    done = true;
    box.className = "card wait ready";
    stateEl.textContent = "Ready — opening the application…";
    bar.className = "bar";
    bar.firstChild.style.width = "100%";
    window.location.replace(target);
  }

  function show(p) {
    var text = "Waiting…", detail = "", pct = null;
    if (p.state === "queued") {
      text = p.position ? "In the queue: position " + p.position : "In the queue";
      detail = "All container slots are busy; you will get the next free one.";
    } else if (p.state === "pulling") {
      text = "Downloading the image…";
      if (p.total) {
        pct = Math.min(100, Math.round(100 * (p.current || 0) / p.total));
        detail = (p.detail ? p.detail + ": " : "") + mb(p.current || 0) + " of " + mb(p.total);
      } else {
        detail = p.detail || "";
      }
    } else if (p.state === "starting") {
      text = "Starting the container…";
      detail = "Waiting until the application answers.";
    } else if (p.state === "ready") {
      go();
      return;
    } else if (p.state === "failed") {
      box.className = "card wait failed";
      text = "It did not start";
      detail = p.detail || "The container could not be started.";
      bar.hidden = true;
      retry.hidden = false;
      done = true;
    }
    stateEl.textContent = text;
    detailEl.textContent = detail;
    if (pct === null) {
      bar.className = "bar indeterminate";
      bar.firstChild.style.width = "";
    } else {
      bar.className = "bar";
      bar.firstChild.style.width = pct + "%";
    }
    if (typeof p.waited === "number") {
      waitedEl.textContent = "(waiting " + Math.round(p.waited) + " s)";
    }
  }

  function poll() {
    if (done) { return; }
    var xhr = new XMLHttpRequest();
    xhr.open("GET", "/monitor:progress/" + encodeURIComponent(token), true);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.onload = function () {
      if (xhr.status === 200) {
        misses = 0;
        try { show(JSON.parse(xhr.responseText)); } catch (e) { /* keep polling */ }
      } else if (xhr.status === 404) {
        go();  // unknown or expired: just try the application again
        return;
      }
      setTimeout(poll, 500);
    };
    xhr.onerror = function () {
      misses += 1;
      setTimeout(poll, Math.min(5000, 500 * misses));
    };
    xhr.send();
  }

  document.getElementById("ds-retry-button").onclick = function () {
    window.location.replace(target);
  };
  poll();
})();
