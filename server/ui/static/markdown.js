// A small Markdown renderer for OCR output: headings, lists, emphasis, code, $$ formulas,
// paragraphs and the HTML tables layout models emit. Every piece of text is HTML-escaped, so a
// document can never inject markup; a table is parsed in an inert document and rebuilt from
// table elements only (rowspan/colspan as plain numbers, no other attribute; other tags keep
// their text, scripts and styles are dropped).
"use strict";
(function (global) {
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  const TABLE_TAGS = new Set(["TABLE", "CAPTION", "COLGROUP", "COL", "THEAD", "TBODY", "TFOOT", "TR", "TH", "TD", "BR"]);
  const DROPPED = new Set(["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT", "IFRAME", "OBJECT", "EMBED", "TEXTAREA", "TITLE", "SVG", "MATH"]);
  function rebuild(from, to) {
    for (const node of from.childNodes) {
      if (node.nodeType === Node.TEXT_NODE) { to.append(node.data); continue; }
      if (node.nodeType !== Node.ELEMENT_NODE || DROPPED.has(node.tagName)) continue;
      if (!TABLE_TAGS.has(node.tagName)) { rebuild(node, to); continue; } // unwrapped: its text stays
      const clean = document.createElement(node.tagName.toLowerCase());
      for (const name of ["rowspan", "colspan"]) {
        const value = (node.getAttribute(name) || "").trim();
        if (/^[1-9][0-9]{0,2}$/.test(value)) clean.setAttribute(name, value);
      }
      rebuild(node, clean);
      to.append(clean);
    }
  }
  /** HTML with only table markup: parsed by DOMParser (inert: no script runs, nothing loads). */
  function safeTable(html) {
    const parsed = new DOMParser().parseFromString(html, "text/html");
    const out = document.createElement("div");
    rebuild(parsed.body, out);
    return `<div class="table-wrap">${out.innerHTML}</div>`;
  }

  function inline(text) {
    return escapeHtml(text)
      .replace(/`([^`]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
  }

  function render(markdown) {
    const lines = String(markdown || "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = null;
    const flushPara = () => { if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; } };
    const flushList = () => { if (list) { out.push(`<${list.tag}>` + list.items.map((i) => `<li>${inline(i)}</li>`).join("") + `</${list.tag}>`); list = null; } };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^(```|\$\$)\s*(.*)$/);
      if (fence) {
        flushPara(); flushList();
        const end = fence[1];
        const body = [];
        if (end === "$$" && fence[2].endsWith("$$")) { body.push(fence[2].slice(0, -2)); }
        else {
          if (end === "$$" && fence[2]) body.push(fence[2]);
          while (++i < lines.length && !lines[i].startsWith(end)) body.push(lines[i]);
        }
        out.push(`<pre class="${end === "$$" ? "formula" : "code"}">` + escapeHtml(body.join("\n")) + "</pre>");
        continue;
      }
      if (/^\s*<table[\s>]/i.test(line)) { // an HTML table, up to the line that closes it
        flushPara(); flushList();
        const body = [line];
        while (!/<\/table>/i.test(body[body.length - 1]) && i + 1 < lines.length) body.push(lines[++i]);
        const html = body.join("\n");
        const end = html.search(/<\/table>/i);
        out.push(safeTable(end < 0 ? html : html.slice(0, end + 8)));
        const rest = end < 0 ? "" : html.slice(end + 8).trim();
        if (rest) para.push(rest);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) { flushPara(); flushList(); const n = heading[1].length; out.push(`<h${n}>${inline(heading[2])}</h${n}>`); }
      else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (!line.trim()) { flushPara(); flushList(); }
      else if (line.startsWith("> ")) { flushPara(); flushList(); out.push(`<blockquote>${inline(line.slice(2))}</blockquote>`); }
      else { flushList(); para.push(line); }
    }
    flushPara(); flushList();
    return out.join("\n");
  }

  global.Markdown = { render, escapeHtml, safeTable };
})(window);
