// arkfed console: polls its own server, swaps the refreshed parts in and draws the AUC charts (uPlot,
// served from /static/vendor). Everything it shows is also on the page without JavaScript.
(function () {
  "use strict";
  var body = document.body;
  var view = body.getAttribute("data-view");
  var poll = Math.max(0.2, parseFloat(body.getAttribute("data-poll") || "2")) * 1000;
  var COLORS = ["#2457c5", "#c5412a", "#1f7a3a", "#8a5ac5", "#c58a00", "#00838f", "#ad1457", "#5d4037"];
  var charts = {};

  function swapLive(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var fresh = doc.getElementById("live"), live = document.getElementById("live");
    if (fresh && live && fresh.innerHTML !== live.innerHTML) { live.innerHTML = fresh.innerHTML; }
    document.title = doc.title;
  }

  function chartData(auc, model) {
    var sites = Object.keys(auc[model] || {});
    var data = [auc.x.slice()];
    sites.forEach(function (site) { data.push(auc[model][site].slice()); });
    return { sites: sites, data: data };
  }

  function drawChart(el, auc, model) {
    var d = chartData(auc, model), points = 0;
    d.data.slice(1).forEach(function (s) { s.forEach(function (v) { if (v !== null) { points += 1; } }); });
    el.setAttribute("data-points", String(points));
    if (!d.data[0].length) { return; }
    var key = model + ":" + d.sites.join(",");
    if (charts[model] && charts[model].key === key) { charts[model].plot.setData(d.data); return; }
    if (charts[model]) { charts[model].plot.destroy(); }
    var series = [{ label: "after visit" }];
    d.sites.forEach(function (site, i) {
      series.push({ label: site, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
                    points: { show: true, size: 6 }, value: function (u, v) { return v === null ? "n/a" : v.toFixed(3); } });
    });
    var width = Math.max(320, Math.min(1100, el.clientWidth || 540));
    var plot = new uPlot({ width: width, height: 240, series: series,
      scales: { x: { time: false }, y: { range: [0, 1] } },
      axes: [{ label: "visits done", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { label: "mean AUC" }] }, d.data, el);
    charts[model] = { key: key, plot: plot };
  }

  function drawCharts(state) {
    ["student", "teacher"].forEach(function (model) {
      var el = document.getElementById("chart-" + model);
      if (el && window.uPlot) { drawChart(el, state.auc, model); }
    });
    body.setAttribute("data-visits", String(state.visits_done));
  }

  function tick() {
    var api = view === "run" ? "/api/run" : "/api/site";
    var page = fetch(window.location.pathname, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.text() : null; });
    var json = fetch(api, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.json() : null; });
    Promise.all([page, json]).then(function (got) {
      if (got[0]) { swapLive(got[0]); }
      if (got[1] && view === "run") { drawCharts(got[1]); }
      if (!(got[1] && got[1].finished)) { window.setTimeout(tick, poll); }
    }, function () { window.setTimeout(tick, poll * 2); });
  }

  if (view === "run" || view === "site") { tick(); }
})();
