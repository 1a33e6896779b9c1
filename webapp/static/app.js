/* Small progressive enhancements; every form still works without JavaScript. */
document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-tabs]")) {
    const kind = form.querySelector("#kind");
    const show = (value) => {
      kind.value = value;
      for (const tab of form.querySelectorAll("[role=tab]")) {
        tab.setAttribute("aria-selected", String(tab.dataset.kind === value));
      }
      for (const block of form.querySelectorAll("[data-for-kind]")) {
        block.hidden = !block.dataset.forKind.split(" ").includes(value);
      }
    };
    form.addEventListener("click", (event) => {
      const tab = event.target.closest("[role=tab]");
      if (tab) show(tab.dataset.kind);
      const submit = event.target.closest("button[data-action]");
      if (submit) form.querySelector("#action").value = submit.dataset.action;
    });
    show(kind.value || "ip");
  }
});
