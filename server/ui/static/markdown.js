// A small Markdown renderer for OCR output: headings, lists, emphasis, code, $$ formulas and
// paragraphs. Every piece of text is HTML-escaped first, so a document can never inject markup;
// HTML tables that layout models emit are therefore shown as source, not as tables.
"use strict";
(function (global) {
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

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

  global.Markdown = { render, escapeHtml };
})(window);
