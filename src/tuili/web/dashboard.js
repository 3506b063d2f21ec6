// The dashboard: polls /v1/stats every second and draws the last two minutes on canvas
// line charts; tables for models, router decisions and requests in flight. Everything
// shown is a figure the server reports; a missing one shows as "–".
"use strict";

(() => {
  const el = Tuili.el;
  const fmt = Tuili.fmt;
  const $ = (id) => document.getElementById(id);
  const PERIOD_MS = 1000;
  const SPAN_S = 120;

  class LineChart {
    constructor(figure, names, opts) {
      this.names = names;
      this.opts = opts || {};
      this.points = [];  // [t_seconds, [values]]
      const caption = figure.querySelector("figcaption").textContent;
      this.canvas = el("canvas", {role: "img", "aria-label": caption, height: 150});
      this.values = names.map(() => el("span", {class: "v", text: "–"}));
      const legend = el("ul", {class: "legend"}, ...names.map((n, k) =>
        el("li", {}, el("span", {class: "sw s" + k}), n + " ", this.values[k])));
      figure.append(this.canvas, legend);
    }

    push(t, values) {
      this.points.push([t, values]);
      while (this.points.length && this.points[0][0] < t - SPAN_S) this.points.shift();
      values.forEach((v, k) => { this.values[k].textContent = v === null ? "–" : fmt(v, this.opts.digits || 0); });
      this.draw();
    }

    draw() {
      const c = this.canvas;
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(c.clientWidth, 200), h = 150;
      if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
      const g = c.getContext("2d");
      const css = getComputedStyle(document.documentElement);
      const color = (name) => css.getPropertyValue(name).trim() || "#888";
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      const left = 44, right = 8, top = 8, bottom = 18;
      let max = this.opts.max || 0;
      if (!this.opts.max) {
        for (const [, vs] of this.points) for (const v of vs) if (v !== null && v > max) max = v;
        max = nice(Math.max(max, this.opts.floor || 1));
      }
      const now = this.points.length ? this.points[this.points.length - 1][0] : 0;
      const x = (t) => left + (w - left - right) * (1 - (now - t) / SPAN_S);
      const y = (v) => top + (h - top - bottom) * (1 - v / max);
      g.font = "11px system-ui, sans-serif";
      g.fillStyle = color("--muted");
      g.strokeStyle = color("--grid");
      g.lineWidth = 1;
      for (const f of [0, 0.5, 1]) {
        const yy = Math.round(y(max * f)) + 0.5;
        g.beginPath(); g.moveTo(left, yy); g.lineTo(w - right, yy); g.stroke();
        g.textAlign = "right"; g.textBaseline = "middle";
        g.fillText(fmt(max * f, Number.isInteger(max * f) ? 0 : 1), left - 6, yy);
      }
      g.textAlign = "left"; g.textBaseline = "alphabetic";
      g.fillText("−" + SPAN_S + " s", left, h - 4);
      g.textAlign = "right";
      g.fillText("now", w - right, h - 4);
      g.lineWidth = 2;
      this.names.forEach((_, k) => {
        g.strokeStyle = color("--s" + k);
        g.beginPath();
        let pen = false;
        for (const [t, vs] of this.points) {
          const v = vs[k];
          if (v === null || v === undefined) { pen = false; continue; }
          if (pen) g.lineTo(x(t), y(Math.min(v, max))); else g.moveTo(x(t), y(Math.min(v, max)));
          pen = true;
        }
        g.stroke();
      });
    }
  }

  function nice(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  const ms = (s) => (s === null || s === undefined ? null : s * 1000);
  const pct = (r) => (r === null || r === undefined ? null : r * 100);
  const charts = {
    tokens: new LineChart($("chart-tokens"), ["output", "prompt"], {digits: 1}),
    requests: new LineChart($("chart-requests"), ["running", "waiting"]),
    ttft: new LineChart($("chart-ttft"), ["p50", "p99"]),
    tpot: new LineChart($("chart-tpot"), ["p50", "p99"], {digits: 1}),
    kv: new LineChart($("chart-kv"), ["device", "host", "disk"]),
    prefix: new LineChart($("chart-prefix"), ["device", "host", "disk"], {max: 100, digits: 1}),
  };

  function uptime(s) {
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? h + " h " + m + " min" : m ? m + " min " + (s % 60) + " s" : s + " s";
  }

  const pair = (a, b, d) => fmt(a, d) + " / " + fmt(b, d);
  const row = (cells) => el("tr", {}, ...cells.map((c) => el("td", {text: c})));

  function update(s) {
    const t = s.time;
    $("total-output-tokens").textContent = fmt(s.totals.output_tokens);
    $("total-prompt-tokens").textContent = fmt(s.totals.prompt_tokens);
    $("total-requests").textContent = fmt(s.totals.requests_finished);
    $("running-waiting").textContent = s.running + " / " + s.waiting;
    $("kv-device").textContent = s.kv.device.used + " / " + s.kv.device.total;
    $("uptime").textContent = uptime(s.uptime_s);
    charts.tokens.push(t, [s.rates.output_tokens_per_s, s.rates.prompt_tokens_per_s]);
    charts.requests.push(t, [s.running, s.waiting]);
    charts.ttft.push(t, [ms(s.latency.ttft.p50), ms(s.latency.ttft.p99)]);
    charts.tpot.push(t, [ms(s.latency.tpot.p50), ms(s.latency.tpot.p99)]);
    charts.kv.push(t, [s.kv.device.used, s.kv.host.blocks, s.kv.disk.blocks]);
    charts.prefix.push(t, ["device", "host", "disk"].map((k) => pct(s.prefix[k].window_hit_rate)));

    $("models-table").tBodies[0].replaceChildren(...s.models.map((m) => row([
      m.name, String(m.running), String(m.waiting), m.kv.device.used + " / " + m.kv.device.total,
      String(m.kv.host.blocks), String(m.kv.disk.blocks), fmt(m.totals.prompt_tokens), fmt(m.totals.output_tokens),
      fmt(m.rates.output_tokens_per_s, 1),
      pair(ms(m.latency.ttft.p50), ms(m.latency.ttft.p99)) + " ms",
      pair(ms(m.latency.tpot.p50), ms(m.latency.tpot.p99), 1) + " ms",
      ["device", "host", "disk"].map((k) => fmt(pct(m.prefix[k].hit_rate), 1) + "%").join(" / "),
    ])));

    const router = s.router;
    $("router-none").hidden = !!router;
    const rows = router ? router.decisions : [];
    const total = rows.reduce((a, d) => a + d.count, 0) || 1;
    $("router-table").tBodies[0].replaceChildren(...rows.map((d) => {
      const tr = row([d.reason, d.model, String(d.count), d.window_count === null ? "–" : String(d.window_count)]);
      tr.append(el("td", {}, el("meter", {min: 0, max: total, value: d.count, title: fmt(100 * d.count / total, 1) + "%"})));
      return tr;
    }));
    if (router) {
      $("router-title").textContent = "Router decisions (" + router.name + ": fast " + router.fast
        + ", strong " + router.strong + ")";
    }

    const flight = s.in_flight;
    $("flight-note").textContent = flight.per_request ? "" : "No rows per request (id, tokens so far, age): " + flight.note + ".";
    $("flight-table").tBodies[0].replaceChildren(...flight.by_model.map((f) =>
      row([f.model, String(f.calls), String(f.running), String(f.waiting)])));
    const win = s.window_s === null ? "since start" : "window " + Math.round(s.window_s) + " s";
    $("status").textContent = "updated " + new Date(t * 1000).toLocaleTimeString() + " · " + win;
    $("status").dataset.ok = "true";
  }

  function problem(text) {
    $("status").textContent = text;
    $("status").dataset.ok = "false";
  }

  async function tick() {
    let wait = PERIOD_MS;
    try {
      const resp = await Tuili.api("/v1/stats");
      if (resp.status === 401) {
        $("notice").textContent = "This server needs an API key to show its figures. Reload the page to enter it.";
        $("notice").hidden = false;
        problem("stopped: no API key");
        return;
      }
      if (!resp.ok) { problem(await Tuili.errorText(resp)); wait = 2000; }
      else { update(await resp.json()); $("notice").hidden = true; }
    } catch (e) {
      problem(e.message + " Retrying.");
      wait = 2000;
    }
    setTimeout(tick, wait);
  }

  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.draw()));
  tick();
})();
