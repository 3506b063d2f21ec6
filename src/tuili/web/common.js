// Shared by the chat page and the dashboard: DOM building without markup, the API key,
// and calls to the server's API with clear errors.
"use strict";

const Tuili = (() => {
  const KEY = "tuili.apiKey";
  let sessionKey = "";  // the key, when local storage refuses to keep it

  // el("p", {class: "x"}, "text", child): children that are strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function apiKey() {
    try { return localStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }

  function setApiKey(value) {
    try {
      if (value) localStorage.setItem(KEY, value); else localStorage.removeItem(KEY);
    } catch (e) { /* storage refused: the key lasts for this page only */ }
    sessionKey = value || "";
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = apiKey() || sessionKey;
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // fetch() with the bearer key; a 401 asks for a key (once per call) and tries again.
  // Network failures throw an Error whose message says the server is unreachable.
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    for (let attempt = 0; ; attempt++) {
      opts.headers = headers(options && options.headers);
      let resp;
      try {
        resp = await fetch(path, opts);
      } catch (e) {
        if (e && e.name === "AbortError") throw e;
        throw new Error("Cannot reach the server at " + location.origin + " (" + (e && e.message || e) + ").");
      }
      if (resp.status !== 401 || attempt > 0) return resp;
      const message = await errorText(resp.clone());
      const key = await askKey(message);
      if (!key) return resp;
      setApiKey(key);
    }
  }

  // The OpenAI-style error message of a response, or its status line.
  async function errorText(resp) {
    let detail = "";
    try {
      const body = await resp.json();
      detail = body && body.error && body.error.message ? body.error.message : JSON.stringify(body);
    } catch (e) {
      detail = resp.statusText || "";
    }
    return "The server answered " + resp.status + (detail ? ": " + detail : ".");
  }

  // The API-key <dialog>, built once per page (both pages share it).
  function keyDialog() {
    let dialog = document.getElementById("key-dialog");
    if (dialog) return dialog;
    const el = (tag, props, children) => {
      const node = Object.assign(document.createElement(tag), props || {});
      (children || []).forEach((c) => node.appendChild(c));
      return node;
    };
    dialog = el("dialog", {id: "key-dialog"}, [el("form", {method: "dialog"}, [
      el("h2", {id: "key-title", textContent: "API key"}),
      el("p", {id: "key-reason"}),
      el("label", {htmlFor: "key-input", textContent: "Key (sent as a bearer token, kept in this browser)"}),
      el("input", {id: "key-input", type: "password", autocomplete: "off"}),
      el("div", {className: "buttons"}, [
        el("button", {value: "cancel", formNoValidate: true, textContent: "Cancel"}),
        el("button", {id: "key-ok", value: "ok", textContent: "Use this key"}),
      ]),
    ])]);
    dialog.setAttribute("aria-labelledby", "key-title");
    document.body.appendChild(dialog);
    return dialog;
  }

  // Asks for the API key in the key dialog; resolves to the key or "".
  function askKey(reason) {
    const dialog = keyDialog();
    const input = document.getElementById("key-input");
    const why = document.getElementById("key-reason");
    if (why) why.textContent = reason || "This server needs an API key.";
    input.value = "";
    return new Promise((resolve) => {
      const done = () => {
        dialog.removeEventListener("close", done);
        resolve(dialog.returnValue === "ok" ? input.value.trim() : "");
      };
      dialog.addEventListener("close", done);
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (typeof value !== "number") return String(value);
    if (Math.abs(value) >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (Math.abs(value) >= 1e4) return (value / 1e3).toFixed(1) + "k";
    return value.toFixed(digits === undefined ? 0 : digits);
  }

  // The nav toggle for narrow windows (both pages have #toggle-sidebar and #sidebar).
  function wireSidebar() {
    const toggle = document.getElementById("toggle-sidebar");
    const side = document.getElementById("sidebar");
    if (!toggle || !side) return;
    toggle.addEventListener("click", () => {
      const open = document.body.classList.toggle("sidebar-open");
      toggle.setAttribute("aria-expanded", String(open));
    });
  }

  return { el, api, apiKey, setApiKey, errorText, askKey, fmt, wireSidebar };
})();
