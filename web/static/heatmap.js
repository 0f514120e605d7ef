// Case page: clicking a syndrome in a photo's ranking opens its saliency heatmap over the aligned face.
(function () {
  "use strict";
  const dialog = document.getElementById("heatmap-dialog");
  const section = document.getElementById("images");
  if (!dialog || !section) return;
  const img = document.getElementById("heatmap-img");
  const title = document.getElementById("heatmap-title");
  const status = document.getElementById("heatmap-status");
  const select = document.getElementById("heatmap-region");
  const FIRST_REGION_COLUMN = 4; // #, Syndrome, Gestalt score, bar, then one column per region
  let current = null;

  function show() {
    if (!current) return;
    const params = new URLSearchParams({ syndrome: current.syndrome, region: select.value });
    status.textContent = "Computing…";
    img.classList.add("loading");
    img.src = dialog.dataset.url.replace("/images/0/", "/images/" + current.imageId + "/") + "?" + params;
  }

  img.addEventListener("load", () => {
    img.classList.remove("loading");
    const label = select.options[select.selectedIndex] ? select.options[select.selectedIndex].text : select.value;
    status.textContent = (select.value === "all" ? "All members, weighted" : label) + " · " + current.syndrome;
  });
  img.addEventListener("error", () => {
    img.classList.remove("loading");
    status.textContent = "The heatmap could not be made for this photo.";
  });

  section.addEventListener("click", (event) => {
    const cell = event.target.closest("article.image .result table.scores td:nth-child(2)");
    if (!cell) return;
    const card = cell.closest("article.image");
    // Every member's own map on request, labelled with its share of the aggregate (weight 0: it decides nothing);
    // by default the members' maps weighted as the model weighs them.
    const members = Array.from(cell.closest("table").querySelectorAll("tr:first-child th"))
      .slice(FIRST_REGION_COLUMN).map((th) => [th.dataset.region || th.textContent, th.textContent]);
    select.replaceChildren(new Option("all members, weighted by their share", "all"),
      ...members.map(([name, label]) => new Option(label, name)));
    current = { imageId: card.id.replace("image-", ""), syndrome: cell.textContent };
    title.textContent = "Heatmap: " + current.syndrome;
    show();
    if (!dialog.open) dialog.showModal();
  });
  select.addEventListener("change", show);
  document.getElementById("heatmap-close").addEventListener("click", () => dialog.close());
}());
