// The chat page: conversations in local storage, answers streamed from
// /v1/chat/completions (server-sent events read from fetch's body stream), a stop button
// that aborts the fetch (the server then aborts the request and frees its KV blocks),
// and per-answer figures (time to first token, tokens per second, tokens used).
// Model and user text reach the page as text only (Tuili.el, Markdown.render).
"use strict";

(() => {
  const el = Tuili.el;
  const $ = (id) => document.getElementById(id);
  const STORE = "tuili.chat.v1";
  const ui = {
    model: $("model"), convs: $("conversations"), messages: $("messages"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), system: $("system"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), notice: $("notice"), newChat: $("new-chat"), forgetKey: $("forget-key"),
  };
  let state = load();
  let routers = {};  // router name -> {fast, strong}
  let busy = null;   // {controller, li, msg} while an answer streams

  // ---- storage ------------------------------------------------------------------------
  function load() {
    let s = null;
    try { s = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { s = null; }
    if (!s || !Array.isArray(s.convs)) s = {convs: [], current: null, settings: {}};
    s.settings = s.settings || {};
    if (!s.convs.length) s.convs.push(newConv());
    if (!s.convs.some((c) => c.id === s.current)) s.current = s.convs[0].id;
    return s;
  }

  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(state)); }
    catch (e) { notice("This browser would not keep the conversations (" + e.message + ")."); }
  }

  function newConv() {
    return {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7), title: "New chat",
            system: "", messages: [], updated: Date.now()};
  }

  const current = () => state.convs.find((c) => c.id === state.current);

  // ---- rendering ----------------------------------------------------------------------
  function notice(text) {
    ui.notice.textContent = text || "";
    ui.notice.hidden = !text;
  }

  function renderConvs() {
    ui.convs.replaceChildren(...state.convs.map((c) => {
      const open = el("button", {type: "button", class: "conv-title", text: c.title,
                                 "aria-current": c.id === state.current ? "true" : null});
      open.addEventListener("click", () => { if (!busy) { state.current = c.id; save(); renderAll(); } });
      const del = el("button", {type: "button", class: "conv-delete", text: "×",
                                "aria-label": "Delete conversation " + c.title});
      del.addEventListener("click", () => {
        if (busy) return;
        state.convs = state.convs.filter((x) => x !== c);
        if (!state.convs.length) state.convs.push(newConv());
        if (state.current === c.id) state.current = state.convs[0].id;
        save(); renderAll();
      });
      return el("li", {class: c.id === state.current ? "current" : null}, open, del);
    }));
  }

  function renderAll() {
    const conv = current();
    renderConvs();
    ui.system.value = conv.system || "";
    ui.messages.replaceChildren(...conv.messages.map(messageNode));
    if (!conv.messages.length) {
      ui.messages.append(el("li", {class: "empty"}, "Ask anything. Answers stream in as the model writes them."));
    }
    scrollDown(true);
  }

  function messageNode(m) {
    const li = el("li", {class: "msg " + m.role});
    li.append(el("div", {class: "who", text: m.role === "user" ? "You" : (m.meta && m.meta.model) || "Assistant"}),
              el("div", {class: "body"}), el("div", {class: "meta"}));
    fill(li, m);
    return li;
  }

  function fill(li, m) {
    const body = li.querySelector(".body");
    const meta = m.meta || {};
    li.dataset.state = meta.state || "done";
    li.dataset.chunks = String(meta.chunks || 0);
    if (m.role === "user") body.textContent = m.content;
    else Markdown.render(m.content, body);
    if (meta.error) body.append(el("p", {class: "error", role: "alert", text: meta.error}));
    if (m.role === "assistant") {
      li.querySelector(".who").textContent = meta.model || "Assistant";
      li.querySelector(".meta").replaceChildren(...metaParts(meta));
    }
  }

  function metaParts(meta) {
    const parts = [];
    const span = (cls, text) => parts.push(el("span", {class: cls, text}));
    if (meta.routed) {
      span("routed", meta.requested + " → " + (meta.model || "?") + (meta.reason ? " (" + meta.reason + ")" : ""));
    }
    if (meta.state === "streaming") span("live", "writing…");
    if (meta.ttft_ms !== undefined) span("ttft", "TTFT " + Tuili.fmt(meta.ttft_ms) + " ms");
    if (meta.tok_s !== undefined) span("speed", Tuili.fmt(meta.tok_s, 1) + " tok/s");
    if (meta.usage) {
      span("usage", meta.usage.prompt_tokens + " prompt + " + meta.usage.completion_tokens + " answer = "
           + meta.usage.total_tokens + " tokens");
    }
    if (meta.state === "stopped") span("stopped", "stopped" + (meta.chunks ? " after " + meta.chunks + " pieces" : ""));
    if (meta.finish === "length") span("finish", "cut at max tokens");
    return parts;
  }

  function scrollDown(force) {
    const main = ui.messages.parentElement;
    const near = main.scrollHeight - main.scrollTop - main.clientHeight < 120;
    if (force || near) main.scrollTop = main.scrollHeight;
  }

  function setBusy(b) {
    busy = b;
    ui.send.disabled = !!b;
    ui.stop.disabled = !b;
    ui.newChat.disabled = !!b;
    document.body.classList.toggle("busy", !!b);
  }

  // ---- models -------------------------------------------------------------------------
  async function loadModels() {
    let resp;
    try {
      resp = await Tuili.api("/v1/models");
    } catch (e) {
      notice(e.message + " Reload the page once it is up.");
      return;
    }
    if (!resp.ok) { notice(await Tuili.errorText(resp)); return; }
    const cards = (await resp.json()).data || [];
    routers = {};
    ui.model.replaceChildren(...cards.map((c) => {
      if (c.routes_to) routers[c.id] = c.routes_to;
      const label = c.routes_to ? c.id + " (routes: " + c.routes_to.fast + " / " + c.routes_to.strong + ")" : c.id;
      return el("option", {value: c.id, text: label});
    }));
    const want = state.settings.model;
    if (want && cards.some((c) => c.id === want)) ui.model.value = want;
    notice("");
  }

  // ---- one answer ---------------------------------------------------------------------
  function history(conv, system) {
    const msgs = [];
    if (system.trim()) msgs.push({role: "system", content: system});
    const list = conv.messages;
    for (let i = 0; i < list.length; i++) {
      const m = list[i];
      const failed = (x) => x && x.role === "assistant" && x.meta && (x.meta.error || !x.content);
      if (m.role === "assistant" && failed(m)) continue;
      if (m.role === "user" && failed(list[i + 1])) continue;
      msgs.push({role: m.role, content: m.content});
    }
    return msgs;
  }

  function requestBody(model, conv) {
    const body = {model, messages: history(conv, conv.system || ""), stream: true,
                  stream_options: {include_usage: true}};
    const t = parseFloat(ui.temperature.value);
    if (!Number.isNaN(t)) body.temperature = t;
    const n = parseInt(ui.maxTokens.value, 10);
    if (!Number.isNaN(n) && n > 0) body.max_tokens = n;
    return body;
  }

  async function decisions() {
    try {
      const r = await Tuili.api("/v1/stats");
      if (!r.ok) return null;
      const s = await r.json();
      const out = {};
      for (const d of (s.router && s.router.decisions) || []) out[d.reason + "|" + d.model] = d.count;
      return out;
    } catch (e) { return null; }
  }

  // The router's reason, from the counters of its decisions before and after this request
  // (the only place the server reports it); blank when another request blurred the count.
  function reasonFrom(before, after, model) {
    if (!before || !after) return "";
    const moved = Object.keys(after).filter((k) => k.endsWith("|" + model) && k.split("|")[0] !== "explicit"
                                                  && after[k] - (before[k] || 0) === 1);
    return moved.length === 1 ? moved[0].split("|")[0] : "";
  }

  async function send() {
    const text = ui.prompt.value;
    if (!text.trim() || busy) return;
    const conv = current();
    const model = ui.model.value;
    if (!model) { notice("No model to ask: the model list did not load."); return; }
    if (conv.title === "New chat") conv.title = text.trim().slice(0, 48);
    conv.messages.push({role: "user", content: text});
    const body = requestBody(model, conv);
    const msg = {role: "assistant", content: "", meta: {state: "streaming", requested: model, routed: !!routers[model], chunks: 0}};
    conv.messages.push(msg);
    conv.updated = Date.now();
    ui.prompt.value = "";
    save();
    renderAll();
    const li = ui.messages.lastElementChild;
    const controller = new AbortController();
    setBusy({controller, li, msg});
    const before = routers[model] ? await decisions() : null;
    try {
      await stream(body, msg, li, controller);
    } finally {
      setBusy(null);
      if (routers[model] && msg.meta.model && !msg.meta.reason) {
        msg.meta.reason = reasonFrom(before, await decisions(), msg.meta.model);
      }
      save();
      fill(li, msg);
      scrollDown();
      ui.prompt.focus();
    }
  }

  async function stream(body, msg, li, controller) {
    const meta = msg.meta;
    const t0 = performance.now();
    let tFirst = null;
    let timer = null;
    const paint = () => {
      if (timer) return;
      timer = setTimeout(() => { timer = null; fill(li, msg); scrollDown(); }, 40);
    };
    const end = (st, error) => { meta.state = st; if (error) meta.error = error; };
    let resp;
    try {
      resp = await Tuili.api("/v1/chat/completions", {method: "POST", signal: controller.signal,
        headers: {"Content-Type": "application/json", "Accept": "text/event-stream"},
        body: JSON.stringify(body)});
    } catch (e) {
      end(e.name === "AbortError" ? "stopped" : "error", e.name === "AbortError" ? "" : e.message);
      return;
    }
    if (!resp.ok) { end("error", await Tuili.errorText(resp)); return; }
    meta.model = resp.headers.get("X-Tuili-Routed-To") || meta.model;
    meta.reason = resp.headers.get("X-Tuili-Route-Reason") || meta.reason;
    paint();
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const onEvent = (data) => {
      if (data === "[DONE]") return true;
      let chunk;
      try { chunk = JSON.parse(data); } catch (e) { return false; }
      if (chunk.error) { meta.error = "The server stopped the answer: " + (chunk.error.message || "error"); return true; }
      if (chunk.model) meta.model = chunk.model;
      if (chunk.usage) meta.usage = chunk.usage;
      for (const c of chunk.choices || []) {
        const piece = c.delta && c.delta.content;
        if (piece) {
          if (tFirst === null) { tFirst = performance.now(); meta.ttft_ms = tFirst - t0; }
          msg.content += piece;
          meta.chunks++;
        }
        if (c.finish_reason) meta.finish = c.finish_reason;
      }
      paint();
      return false;
    };
    try {
      let done = false;
      while (!done) {
        const {value, done: eof} = await reader.read();
        if (eof) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while (!done && (cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) done = onEvent(data);
        }
      }
      end(meta.error ? "error" : "done");
    } catch (e) {
      if (e.name === "AbortError") end("stopped");
      else end("error", "The connection broke off: " + e.message);
    } finally {
      clearTimeout(timer);
      const tEnd = performance.now();
      const n = meta.usage ? meta.usage.completion_tokens : null;
      if (tFirst !== null && n && n > 1 && tEnd > tFirst) meta.tok_s = (n - 1) / ((tEnd - tFirst) / 1000);
    }
  }

  function stop() {
    if (busy) busy.controller.abort();
  }

  // ---- wiring -------------------------------------------------------------------------
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && busy && !document.querySelector("dialog[open]")) { e.preventDefault(); stop(); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", () => {
    const blank = state.convs.find((c) => !c.messages.length);
    const conv = blank || newConv();
    if (!blank) state.convs.unshift(conv);
    state.current = conv.id;
    save(); renderAll(); ui.prompt.focus();
  });
  ui.system.addEventListener("input", () => { current().system = ui.system.value; save(); });
  ui.model.addEventListener("change", () => { state.settings.model = ui.model.value; save(); });
  for (const [input, key] of [[ui.temperature, "temperature"], [ui.maxTokens, "maxTokens"]]) {
    if (state.settings[key] !== undefined) input.value = state.settings[key];
    input.addEventListener("change", () => { state.settings[key] = input.value; save(); });
  }
  ui.forgetKey.addEventListener("click", () => { Tuili.setApiKey(""); notice("The API key is forgotten."); });
  Tuili.wireSidebar();
  renderAll();
  loadModels();
  ui.prompt.focus();
})();
