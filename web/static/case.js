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

  const ranking = document.getElementById("case-ranking");
  const DISPLAY = ranking ? JSON.parse(ranking.dataset.display) : { regions: {}, statuses: {}, status_hints: {} };
  const regionLabel = (r) => DISPLAY.regions[r] || r.replace(/_/g, " ");
  const statusLabel = (s) => DISPLAY.statuses[s] || s.replace(/_/g, " ");

  function catalogueLink(r) {
    const id = r.omim || r.orpha;
    if (!id) return el("span", { class: "meta" }, "local");
    const [source, number] = id.split(":");
    const href = source === "OMIM" ? "https://omim.org/entry/" + number
      : "https://www.orpha.net/en/disease/detail/" + number;
    return el("a", { href: href, target: "_blank", rel: "noopener noreferrer" }, id);
  }

  function band(score, top) {
    const ratio = top > 0 ? score / top : 0;
    return ratio >= 0.66 ? "high" : ratio >= 0.33 ? "medium" : "low";
  }

  function scoreCell(score, top) {
    const cell = el("td", { class: "similarity" });
    const bar = el("div", { class: "bar" });
    const fill = el("span");
    fill.style.width = Math.round(100 * (top > 0 ? score / top : 0)) + "%";
    bar.append(fill);
    cell.append(bar, el("span", { class: "band band-" + band(score, top) }, band(score, top) + " · " + score.toFixed(2)));
    return cell;
  }

  function renderResult(card, result) {
    if (!result.ranking.length) {  // the gallery model ranks the case by its nearest patients, not each photo
      card.append(el("p", { class: "meta result" }, "Described by the identity encoder for the gallery (model " +
        result.model_version.name + "); no trained model yet."));
      return;
    }
    // One photo's full ranking and its regions: folded away, one click from the case ranking.
    const box = el("details", { class: "result" });
    const top = result.ranking[0];
    box.append(el("summary", {}, "All syndromes and regions for this photo" +
      (top ? " (top: " + top.name + ", " + top.score.toFixed(2) + ")" : "")));
    const head = el("p", { class: "meta" }, "Model " + result.model_version.name + ". Click a syndrome for its heatmap.");
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
      box.open = true;
    }
    box.append(head);
    const regions = Object.keys(result.regions);
    const weights = result.weights || {};
    const table = el("table", { class: "scores" });
    const hr = el("tr");
    ["#", "Syndrome", "Gestalt score", ""].forEach((h) => hr.append(el("th", {}, h)));
    // Each member's column says its share of the aggregate; a member at weight 0 is scored and kept, and decides
    // nothing in this model.
    regions.forEach((reg) => {
      const w = weights[reg];
      const note = w === undefined ? "" : (w > 0 ? " · weight " + w.toFixed(2) : " · weight 0");
      const th = el("th", { "data-region": reg, "data-weight": w === undefined ? "" : String(w),
        title: w === 0 ? "weight 0: this member's scores are kept, and decide nothing in this model" : "" },
      regionLabel(reg) + note);
      if (w === 0) th.classList.add("no-weight");
      hr.append(th);
    });
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
    const box = el("figure", { class: "face", title: "Click to enlarge" });
    const img = el("img", { src: face.aligned_url, alt: "aligned face", width: String(face.size), height: String(face.size) });
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + face.size + " " + face.size);
    svg.setAttribute("class", "landmarks");
    Object.entries(face.regions || {}).forEach(([name, [x0, y0, x1, y1]]) => {
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", x0); r.setAttribute("y", y0); r.setAttribute("width", x1 - x0); r.setAttribute("height", y1 - y0);
      r.setAttribute("class", "region");
      const t = document.createElementNS(NS, "title");
      t.textContent = regionLabel(name);
      r.append(t);
      svg.append(r);
    });
    face.landmarks.forEach(([x, y]) => {
      const c = document.createElementNS(NS, "circle");
      c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", "1.6");
      svg.append(c);
    });
    const toggle = el("button", { type: "button" }, "Landmarks and regions");
    toggle.addEventListener("click", (e) => { e.stopPropagation(); svg.classList.toggle("hidden"); });
    box.addEventListener("click", () => box.classList.toggle("zoomed"));
    const caption = el("figcaption", {}, face.faces_found > 1 ? face.faces_found + " faces found; the largest is analysed" : "Aligned face");
    box.append(img, svg, caption, toggle);
    card.append(box);
    const q = face.quality || {};
    const pose = q.pitch_degrees === undefined ? "" :
      " (head turned " + Math.round(Math.abs(q.yaw_degrees)) + "°, tilted " + Math.round(Math.abs(q.pitch_degrees)) + "°)";
    (face.flags || []).forEach((text) => card.append(el("p", { class: "flag warn" }, "Scored; " + text + pose)));
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
    const box = el("details", { class: "measurements" });
    box.append(el("summary", {}, "Facial measurements" + (face.rotation ? " (photo turned " + face.rotation + "°)" : "")));
    const table = el("table", { class: "scores measurements" });
    MEASUREMENTS.forEach(([key, label, digits]) => {
      if (face.measurements[key] === undefined) return;
      const tr = el("tr", { "data-measurement": key });
      tr.append(el("th", {}, label), el("td", {}, face.measurements[key].toFixed(digits)), el("td", { class: "meta" }, "no reference"));
      table.append(tr);
    });
    box.append(table, el("p", { class: "meta" }, "No normative reference by age and sex is shipped yet: compare with your own references."));
    return box;
  }

  function renderCaseResult(payload) {
    // The case's ranking: one model and the finished photos it scored (shared.services.ranking).
    const body = document.getElementById("case-ranking-body");
    const result = payload.case_result;
    if (!body || !result) return;
    const photos = result.gallery_only ? [] : payload.images.map((image, i) => ({ n: i + 1, image: image }))
      .filter((p) => result.image_ids.includes(p.image.id) && p.image.result);
    const key = result.model_version.id + ":" + result.image_ids.join(",") + ":" + result.left_out;
    if (body.dataset.state === key) return;
    body.dataset.state = key;
    const model = DISPLAY.model;
    const gallery = result.gallery_only;
    let about = gallery ? "Ranked by similarity to " + gallery.patients + " diagnosed patient" + (gallery.patients === 1 ? "" : "s")
      + " of " + gallery.syndromes + " syndrome" + (gallery.syndromes === 1 ? "" : "s") + "; no trained model yet"
      : (result.photos > 1 ? "Mean of " + result.photos + " photos" : "One photo") + ", model " + result.model_version.name;
    if (model && model.name === result.model_version.name && model.validation && model.validation.top1 !== null) {
      const v = model.validation;
      about += ": on " + (v.n || "its") + " held-out photos the true syndrome ranked first for " + Math.round(100 * v.top1) + "%";
      if (v.topk !== null && model.classes > v.k) about += " and in the top " + v.k + " for " + Math.round(100 * v.topk) + "%";
      about += " (" + model.classes + " syndromes known)";
    }
    if (result.left_out) about += ". Left out: " + result.left_out + " photo" + (result.left_out > 1 ? "s" : "") + " scored by another model only";
    const table = el("table", { class: "scores ranking" });
    const hr = el("tr");
    ["#", "Syndrome", "ID", "Genes", "Similarity"].forEach((h) => hr.append(el("th", {}, h)));
    photos.forEach((p) => hr.append(el("th", { class: "photo" }, "Photo " + p.n)));
    table.append(hr);
    const top = result.ranking.length ? result.ranking[0].score : 0;
    result.ranking.slice(0, 30).forEach((r, i) => {
      const tr = el("tr", i >= 10 ? { class: "more" } : {});
      const genes = r.genes || [];
      tr.append(el("td", {}, String(r.rank)), el("td", { class: "name" }, r.name));
      const id = el("td");
      id.append(catalogueLink(r));
      tr.append(id, el("td", { class: "genes", title: genes.join(", ") }, genes.slice(0, 3).join(", ") + (genes.length > 3 ? " …" : "")));
      tr.append(scoreCell(r.score, top));
      photos.forEach((p) => {
        const own = p.image.result.ranking.find((x) => x.syndrome_id === r.syndrome_id);
        tr.append(el("td", { class: "photo" }, own ? own.score.toFixed(2) : "–"));
      });
      table.append(tr);
    });
    const children = [el("p", { class: "meta" }, about), table];
    if (result.ranking.length > 10) {
      const more = el("button", { type: "button", class: "link" }, "Show up to 30");
      more.addEventListener("click", () => {
        table.classList.toggle("expanded");
        more.textContent = table.classList.contains("expanded") ? "Show the top 10" : "Show up to 30";
      });
      children.push(more);
    }
    body.replaceChildren(...children);
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
      h.append(el("span", { class: "status status-" + image.status }, statusLabel(image.status)));
      const ood = image.result && image.result.ood;
      if (ood && ood.unusual) {
        // The identity encoder places this photo far from every photo the model learned from.
        const why = "This photo is unlike the photos the model learned from: it lies further from them than " +
          ood.percentile.toFixed(0) + "% of the held-out photos of the training collection. " +
          "Treat its scores with extra caution.";
        h.append(el("span", { class: "status status-unusual ood", title: why, role: "note", "aria-label": why },
          "Unlike the training photos"));
      }
      card.append(h);
      if (image.reason) card.append(el("p", { class: "reason" }, image.reason));
      const hint = DISPLAY.status_hints[image.status];
      if (hint) card.append(el("p", { class: "meta hint" }, hint));
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
