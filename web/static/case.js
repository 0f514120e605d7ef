// Case page: per-photo upload progress, and live status and results by polling the JSON API.
(function () {
  "use strict";
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const form = document.getElementById("upload-form");
  const input = document.getElementById("photo-input");
  const progress = document.getElementById("upload-progress");
  const section = document.getElementById("images");
  const caseUrl = section.dataset.caseUrl;
  const FINAL = new Set(["done", "rejected", "failed"]);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function uploadOne(file) {
    const item = el("li", {}, file.name + ": ");
    const bar = el("progress", { max: "100", value: "0" });
    const note = el("span");
    item.append(bar, note);
    progress.append(item);
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRFToken", token);
      xhr.setRequestHeader("X-Requested-With", "fetch");
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = { error: xhr.statusText }; }
        if (xhr.status === 201) {
          bar.value = 100;
          note.textContent = " uploaded";
        } else {
          // A refused file gets no full progress bar, and its name once.
          const error = String(body.error || xhr.status);
          bar.remove();
          item.classList.add("refused");
          note.textContent = "refused: " + (error.startsWith(file.name + ": ") ? error.slice(file.name.length + 2) : error);
        }
        resolve();
      };
      xhr.onerror = () => { bar.remove(); item.classList.add("refused"); note.textContent = "network error"; resolve(); };
      const data = new FormData();
      data.append("photo", file);
      xhr.send(data);
    });
  }

  const zone = document.getElementById("drop-zone");
  const previews = document.getElementById("previews");
  let chosen = [];
  function choose(files) {
    chosen = Array.from(files);
    previews.replaceChildren(...chosen.map((f) => {
      const img = el("img", { class: "preview", alt: f.name, title: f.name });
      img.src = URL.createObjectURL(f);
      return img;
    }));
  }
  input.addEventListener("change", () => choose(input.files));
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => { e.preventDefault(); choose(e.dataTransfer.files); });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const file of chosen) { await uploadOne(file); }
    input.value = "";
    choose([]);
    poll();
  });

  function renderResult(card, result) {
    const box = el("div", { class: "result" });
    const head = el("p", { class: "meta" }, "Model " + result.model_version.name);
    if (result.outdated) {
      head.append(el("span", { class: "warn" }, " · scored by an older model than the active one "));
      const again = el("button", { type: "button" }, "Re-score");
      again.addEventListener("click", async () => {
        again.disabled = true;
        await fetch("/api/v1/images/" + card.id.replace("image-", "") + "/rescore",
          { method: "POST", headers: { "X-CSRFToken": token, Accept: "application/json" } });
        poll();
      });
      head.append(again);
    }
    box.append(head);
    const regions = Object.keys(result.regions);
    const table = el("table", { class: "scores" });
    const hr = el("tr");
    ["#", "Syndrome", "Gestalt score", ""].concat(regions).forEach((h) => hr.append(el("th", {}, h)));
    table.append(hr);
    result.ranking.forEach((r) => {
      const tr = el("tr");
      // Genes as the name's tooltip: the name cell's text is what the heatmap dialog looks up.
      const genes = (r.genes || []).length ? "Genes: " + r.genes.join(", ") : "no genes in the catalogue";
      tr.append(el("td", {}, String(r.rank)), el("td", { title: genes }, r.name), el("td", {}, r.score.toFixed(3)));
      const cell = el("td");
      const bar = el("div", { class: "bar" });
      const fill = el("span");
      fill.style.width = Math.round(100 * r.score) + "%";
      bar.append(fill);
      cell.append(bar);
      tr.append(cell);
      regions.forEach((reg) => tr.append(el("td", {}, (result.regions[reg][String(r.syndrome_id)] || 0).toFixed(3))));
      table.append(tr);
    });
    box.append(table);
    card.append(box);
  }

  function renderFace(card, face) {
    const NS = "http://www.w3.org/2000/svg";
    const box = el("figure", { class: "face" });
    const img = el("img", { src: face.aligned_url, alt: "aligned face", width: String(face.size), height: String(face.size) });
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + face.size + " " + face.size);
    svg.setAttribute("class", "landmarks");
    face.landmarks.forEach(([x, y]) => {
      const c = document.createElementNS(NS, "circle");
      c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", "0.8");
      svg.append(c);
    });
    const toggle = el("button", { type: "button" }, "Landmarks");
    toggle.addEventListener("click", () => svg.classList.toggle("hidden"));
    box.append(img, svg, el("figcaption", {}, face.faces_found > 1 ? face.faces_found + " faces found; the largest is analysed" : "aligned face"), toggle);
    card.append(box);
    if (face.measurements) card.append(renderMeasurements(face));
  }

  // Labels and formats of the facial measurements (definitions: docs/preprocessing.md).
  const MEASUREMENTS = [
    ["canthal_index", "Canthal index (inner / outer canthal distance x 100)", 1],
    ["palpebral_fissure_length", "Palpebral fissure length / face width", 3],
    ["palpebral_fissure_slant", "Palpebral fissure slant (degrees, + up)", 1],
    ["interpupillary_distance", "Interpupillary distance / face width", 3],
    ["mouth_width", "Mouth width / face width", 3],
    ["philtrum_length", "Philtrum length / face width", 3],
    ["face_height_width", "Face height (nasion-menton) / width", 3],
  ];

  function renderMeasurements(face) {
    const table = el("table", { class: "scores measurements" });
    table.append(el("caption", {}, "Facial measurements" + (face.rotation ? " (photo turned " + face.rotation + "°)" : "")));
    MEASUREMENTS.forEach(([key, label, digits]) => {
      if (face.measurements[key] === undefined) return;
      const tr = el("tr", { "data-measurement": key });
      tr.append(el("th", {}, label), el("td", {}, face.measurements[key].toFixed(digits)));
      table.append(tr);
    });
    return table;
  }

  function renderCaseResult(payload) {
    let card = document.getElementById("case-result");
    if (!payload.case_result) { if (card) card.remove(); return; }
    if (!card) { card = el("article", { class: "card", id: "case-result" }); section.prepend(card); }
    const key = payload.case_result.model_version.id + ":" + payload.case_result.photos;
    if (card.dataset.state === key) return;
    card.dataset.state = key;
    card.replaceChildren(el("h2", {}, "Case ranking (mean of " + payload.case_result.photos + " photos)"));
    const table = el("table", { class: "scores" });
    const hr = el("tr");
    ["#", "Syndrome", "Gestalt score"].forEach((h) => hr.append(el("th", {}, h)));
    table.append(hr);
    payload.case_result.ranking.slice(0, 10).forEach((r) => {
      const tr = el("tr");
      // Genes as the name's tooltip: the name cell's text is what the heatmap dialog looks up.
      const genes = (r.genes || []).length ? "Genes: " + r.genes.join(", ") : "no genes in the catalogue";
      tr.append(el("td", {}, String(r.rank)), el("td", { title: genes }, r.name), el("td", {}, r.score.toFixed(3)));
      table.append(tr);
    });
    card.append(el("p", { class: "meta" }, "Model " + payload.case_result.model_version.name), table);
  }

  function render(payload) {
    renderCaseResult(payload);
    payload.images.forEach((image, i) => {
      let card = document.getElementById("image-" + image.id);
      if (!card) { card = el("article", { class: "card image", id: "image-" + image.id }); section.append(card); }
      if (card.dataset.state === image.status + (image.result ? image.result.model_version.id : "")) return;
      card.dataset.state = image.status + (image.result ? image.result.model_version.id : "");
      card.replaceChildren();
      const h = el("h2", {}, "Photo " + (i + 1));
      h.append(el("span", { class: "status status-" + image.status }, image.status));
      card.append(h);
      if (image.reason) card.append(el("p", { class: "reason" }, image.reason));
      if (image.face) renderFace(card, image.face);
      if (image.result) renderResult(card, image.result);
    });
    return payload.images.every((img) => FINAL.has(img.status) || img.status === "awaiting_model");
  }

  let timer = null;
  async function poll() {
    clearTimeout(timer);
    const res = await fetch(caseUrl + "?poll=1", { headers: { Accept: "application/json" } });
    if (!res.ok) return;
    const settled = render(await res.json());
    timer = setTimeout(poll, settled ? 10000 : 1000);
  }
  poll();
}());
