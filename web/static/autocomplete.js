// Catalogue autocomplete: HPO terms on the new-case form, syndromes on the diagnosis form.
// An <input data-autocomplete="URL" data-key="terms|syndromes"> gets a <datalist> filled from
// URL?q=...; with data-append-to="ID" a picked HPO term is appended (as "HP:... Name") to that
// textarea and the search box is cleared. No inline script, no eval (the CSP forbids both).
(function () {
  "use strict";
  document.querySelectorAll("input[data-autocomplete]").forEach((input) => {
    const list = document.getElementById(input.getAttribute("list"));
    const target = input.dataset.appendTo ? document.getElementById(input.dataset.appendTo) : null;
    let timer = null;
    let seq = 0;
    let labels = new Set();

    async function suggest() {
      const q = input.value.trim();
      if (q.length < 2 || labels.has(q)) return;
      const mine = ++seq;
      const res = await fetch(input.dataset.autocomplete + "?q=" + encodeURIComponent(q),
        { headers: { Accept: "application/json" } });
      if (!res.ok || mine !== seq) return;
      const items = (await res.json())[input.dataset.key] || [];
      labels = new Set(items.map((it) => it.label));
      list.replaceChildren(...items.map((it) => {
        const opt = document.createElement("option");
        opt.value = it.label;
        if (it.genes && it.genes.length) opt.textContent = it.label + " · " + it.genes.slice(0, 6).join(", ");
        return opt;
      }));
    }

    function pick() {
      const value = input.value.trim();
      if (!target || !labels.has(value)) return;
      const id = value.split(" ")[0];
      const lines = target.value.split("\n").map((l) => l.trim()).filter(Boolean);
      if (!lines.some((l) => l.split(" ")[0] === id)) lines.push(value);
      target.value = lines.join("\n");
      input.value = "";
      list.replaceChildren();
    }

    input.addEventListener("input", () => {
      if (labels.has(input.value.trim())) { pick(); return; }
      clearTimeout(timer);
      timer = setTimeout(suggest, 200);
    });
    input.addEventListener("change", pick);
    input.addEventListener("keydown", (e) => { if (e.key === "Enter" && target) { e.preventDefault(); pick(); } });
  });
}());
