// Destructive and model-changing actions ask first: a form (or its submit button) with data-confirm.
document.addEventListener("submit", (event) => {
  const source = event.submitter && event.submitter.dataset.confirm ? event.submitter : event.target;
  const message = source.dataset ? source.dataset.confirm : null;
  if (message && !window.confirm(message)) event.preventDefault();
});
