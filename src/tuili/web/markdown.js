// A small Markdown renderer that builds DOM nodes and never parses markup: every piece of
// model text reaches the page through createTextNode / textContent, so "<script>" or
// "<img onerror=...>" in an answer shows as those characters. Links keep only http(s)
// targets; images are shown as links (the page loads nothing from other origins).
// Covers what chat answers use: fenced code blocks (open ones too, while streaming),
// headings, lists, quotes, rules, tables, paragraphs with line breaks, `code`, **bold**,
// *italic*, ~~strike~~, [links](https://...) and bare https:// addresses.
"use strict";

const Markdown = (() => {
  const el = Tuili.el;
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

  function render(text, container) {
    container.replaceChildren(...blocks(String(text || "").replace(/\r\n?/g, "\n").split("\n")));
  }

  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        const body = [];
        i++;
        while (i < lines.length && !close.test(lines[i])) body.push(lines[i++]);
        i++;  // the closing fence (or the end of a still-streaming answer)
        out.push(codeBlock(body.join("\n"), m[2]));
      } else if ((m = HEADING.exec(line))) {
        out.push(inline(m[2], el("h" + m[1].length))); i++;
      } else if (RULE.test(line)) {
        out.push(el("hr")); i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
        out.push(el("blockquote", {}, ...blocks(body)));
      } else if (ITEM.test(line)) {
        i = list(lines, i, out);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        i = table(lines, i, out);
      } else {
        const para = [];
        while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) para.push(lines[i++]);
        if (!para.length) para.push(lines[i++]);
        const p = el("p");
        para.forEach((l, k) => { if (k) p.append(el("br")); inline(l.trim(), p); });
        out.push(p);
      }
    }
    return out;
  }

  function startsBlock(lines, i) {
    const l = lines[i];
    return FENCE.test(l) || HEADING.test(l) || RULE.test(l) || QUOTE.test(l) || ITEM.test(l);
  }

  function codeBlock(code, lang) {
    const wrap = el("div", {class: "code"});
    const bar = el("div", {class: "code-bar"}, el("span", {text: lang || "code"}));
    const copy = el("button", {type: "button", class: "copy", text: "Copy", "aria-label": "Copy code"});
    copy.addEventListener("click", () => {
      if (navigator.clipboard) navigator.clipboard.writeText(code).then(() => { copy.textContent = "Copied"; });
    });
    bar.append(copy);
    const codeEl = el("code", {text: code});
    if (/^[\w+#.-]{1,24}$/.test(lang || "")) codeEl.className = "language-" + lang;
    wrap.append(bar, el("pre", {}, codeEl));
    return wrap;
  }

  function list(lines, i, out) {
    const first = ITEM.exec(lines[i]);
    const ordered = /\d/.test(first[2]);
    const indent = first[1].length;
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.setAttribute("start", String(parseInt(first[2], 10)));
    let item = null;
    while (i < lines.length) {
      const line = lines[i];
      const m = ITEM.exec(line);
      if (m && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered) {
        item = { lines: [m[3]] };
        node.append(item.li = el("li"));
        item.li._md = item;
        i++;
      } else if (line.trim() && item && (/^\s/.test(line) || !startsBlock(lines, i))) {
        item.lines.push(line.slice(Math.min(indent + 2, line.length - line.trimStart().length)));
        i++;
      } else if (!line.trim() && i + 1 < lines.length && /^\s+\S/.test(lines[i + 1]) && item) {
        item.lines.push(""); i++;
      } else {
        break;
      }
    }
    for (const li of node.children) {
      const body = blocks(li._md.lines);
      // A one-paragraph item renders without the <p>, as lists usually look.
      if (body.length && body[0].tagName === "P") li.append(...body.shift().childNodes);
      li.append(...body);
      delete li._md;
    }
    out.push(node);
    return i;
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  function table(lines, i, out) {
    const head = cells(lines[i]);
    const t = el("table");
    const tr = el("tr");
    head.forEach((c) => tr.append(inline(c, el("th"))));
    t.append(el("thead", {}, tr));
    const body = el("tbody");
    i += 2;
    while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
      const row = el("tr");
      cells(lines[i]).forEach((c) => row.append(inline(c, el("td"))));
      body.append(row);
      i++;
    }
    t.append(body);
    out.push(el("div", {class: "table-wrap"}, t));
    return i;
  }

  // Inline spans; the alternatives are tried left to right at each position.
  const INLINE = new RegExp([
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",                  // 1,2 code
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",                     // 3 bold
    "__(?=\\S)([\\s\\S]*?\\S)__",                             // 4 bold
    "~~(?=\\S)([\\s\\S]*?\\S)~~",                             // 5 strike
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",                   // 6 italic
    "(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])",    // 7 italic
    "!?\\[([^\\]]*)\\]\\(\\s*([^)\\s]*)(?:\\s+\"[^\"]*\")?\\s*\\)",  // 8,9 link or image
    "(https?:\\/\\/[^\\s<>()]*[^\\s<>().,;:!?'\"\\]])",       // 10 bare address
  ].join("|"), "g");

  function inline(text, parent) {
    const re = new RegExp(INLINE.source, "g");  // its own, since spans nest
    let last = 0;
    let m;
    while ((m = re.exec(text))) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      if (m[2] !== undefined) parent.append(el("code", {text: m[2]}));
      else if (m[3] !== undefined) parent.append(inline(m[3], el("strong")));
      else if (m[4] !== undefined) parent.append(inline(m[4], el("strong")));
      else if (m[5] !== undefined) parent.append(inline(m[5], el("del")));
      else if (m[6] !== undefined) parent.append(inline(m[6], el("em")));
      else if (m[7] !== undefined) parent.append(inline(m[7], el("em")));
      else if (m[8] !== undefined) parent.append(link(m[9], m[8] || m[9]));
      else parent.append(link(m[10], m[10]));
      last = re.lastIndex;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
    return parent;
  }

  function link(href, label) {
    if (!/^https?:\/\//i.test(href || "")) return document.createTextNode(label);
    const a = el("a", {href: href, rel: "noopener noreferrer nofollow", target: "_blank"});
    return inline(label, a);
  }

  return { render };
})();
