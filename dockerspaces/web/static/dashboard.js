// dockerspaces dashboard: poll /monitor:broker/ (JSON) and render tables.
(function () {
  "use strict";
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function row(tbody, cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) {
      var td = document.createElement("td");
      if (c instanceof Node) { td.appendChild(c); } else { td.textContent = c === null || c === undefined ? "" : String(c); }
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  }
  function ago(since) {
    if (!since) { return ""; }
    var s = Math.max(0, Math.round(Date.now() / 1000 - since));
    if (s < 120) { return s + " s ago"; }
    if (s < 7200) { return Math.round(s / 60) + " min ago"; }
    return Math.round(s / 3600) + " h ago";
  }
  function body(id) {
    var tb = document.querySelector("#" + id + " tbody");
    while (tb.firstChild) { tb.removeChild(tb.firstChild); }
    return tb;
  }
  function render(snap) {
    var slots = snap.TargetSlots || [], hosts = {}, order = [];
    var sb = body("ds-slots");
    slots.forEach(function (s) {
      var h = s.Host || "local";
      if (!hosts[h]) { hosts[h] = {n: 0, run: 0, idle: 0, starting: 0, free: 0, inflight: 0}; order.push(h); }
      var hs = hosts[h];
      hs.n += 1;
      if (s.State === "Run") { hs.run += 1; } else if (s.State === "Wait") { hs.idle += 1; }
      else if (s.State === "Starting") { hs.starting += 1; }
      else if (s.State === "Free") { hs.free += 1; }
      hs.inflight += s.InFlight || 0;
      row(sb, [h + ":" + (s.Port || ""), el("span", s.State, "pill s-" + s.State), ago(s.Since),
               el("span", (s.Container || "").slice(0, 12), "mono"), el("span", s.Key || s.SlotType || "", "mono"),
               s.InFlight, s.Gpu, s.LastError ? el("span", s.LastError, "err") : ""]);
    });
    var hb = body("ds-hosts");
    order.forEach(function (h) {
      var hs = hosts[h];
      row(hb, [h, hs.n, hs.run, hs.idle, hs.starting, hs.free, hs.inflight]);
    });
    var pb = body("ds-apps"), apps = snap.Apps || [], shown = {};
    apps.forEach(function (a) {
      if (shown[a.Key]) { return; }
      shown[a.Key] = true;
      // an absolute link (--public-url), else its own host (--app-domain) on this
      // page's scheme and port, else its route
      var href = a.Link && a.Link.indexOf("://") > 0 ? a.Link
        : a.Host ? location.protocol + "//" + a.Host + (location.port ? ":" + location.port : "") + "/" : a.Link;
      var link = href ? el("a", href) : el("span", "(its address names env values)", "muted");
      if (href) { link.href = href; }
      row(pb, [el("span", a.Key, "mono"), link]);
    });
    if (!apps.length) { row(pb, [el("span", "no app is running", "muted"), ""]); }
    var qb = body("ds-queues"), queues = snap.Queues || {}, keys = Object.keys(queues);
    keys.forEach(function (k) { row(qb, [el("span", k, "mono"), queues[k]]); });
    if (!keys.length) { row(qb, [el("span", "nobody is waiting", "muted"), ""]); }
    var ab = body("ds-autoscale"), auto = snap.Autoscale || {}, names = Object.keys(auto);
    names.forEach(function (n) {
      var a = auto[n];
      row(ab, [el("span", n, "mono"), a.Desired, a.Actual, a.Ready, a.Unacked, a.Consumers,
               a.LastDecision, a.Reason ? el("span", a.Reason, a.Unreachable ? "err" : "") : ""]);
    });
    if (!names.length) { row(ab, [el("span", "no [[autoscale]] entries", "muted"), "", "", "", "", "", "", ""]); }
    var src = snap.SourceSlots || [], busy = src.filter(function (s) { return s.State !== "Free"; }).length;
    document.getElementById("ds-sources").textContent = busy + " of " + src.length + " admission places in use";
    document.getElementById("ds-updated").textContent = new Date().toLocaleTimeString();
  }
  function poll() {
    var xhr = new XMLHttpRequest();
    xhr.open("GET", window.location.pathname, true);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.onload = function () {
      var err = document.getElementById("ds-error");
      if (xhr.status === 200) {
        err.textContent = "";
        try { render(JSON.parse(xhr.responseText)); } catch (e) { err.textContent = "bad answer: " + e; }
      } else {
        err.textContent = "HTTP " + xhr.status;
      }
      setTimeout(poll, 2000);
    };
    xhr.onerror = function () {
      document.getElementById("ds-error").textContent = "dockerspaces does not answer";
      setTimeout(poll, 4000);
    };
    xhr.send();
  }
  poll();
})();
