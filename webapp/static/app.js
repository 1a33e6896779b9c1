/* Small progressive enhancements; every form still works without JavaScript.
   Everything is (re)initialised through htmx.onLoad, so content swapped in by HTMX gets the
   same behaviour as the first page. */
(function () {
  "use strict";

  // "Add a user" tabs: one delegated listener, so forms swapped in by HTMX work at once.
  function showKind(form, value) {
    form.querySelector("#kind").value = value;
    for (const tab of form.querySelectorAll("[role=tab]")) {
      const selected = tab.dataset.kind === value;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
    }
    for (const block of form.querySelectorAll("[data-for-kind]")) {
      block.hidden = !block.dataset.forKind.split(" ").includes(value);
    }
  }

  function bindTabs() {
    document.addEventListener("click", (event) => {
      const tab = event.target.closest("form[data-tabs] [role=tab]");
      if (!tab) return;
      event.preventDefault();
      showKind(tab.closest("form"), tab.dataset.kind);
      history.replaceState(null, "", tab.href);
    });
    document.addEventListener("keydown", (event) => {
      const tab = event.target.closest("form[data-tabs] [role=tab]");
      if (!tab || !["ArrowLeft", "ArrowRight"].includes(event.key)) return;
      const form = tab.closest("form");
      const tabs = [...form.querySelectorAll("[role=tab]")];
      const step = event.key === "ArrowRight" ? 1 : tabs.length - 1;
      const next = tabs[(tabs.indexOf(tab) + step) % tabs.length];
      next.focus();
      showKind(form, next.dataset.kind);
    });
  }

  // data-show-if="checkbox_id" or "select_id=value": shown only while that holds.
  function updateShowIf() {
    for (const block of document.querySelectorAll("[data-show-if]")) {
      const [id, value] = block.dataset.showIf.split("=");
      const control = document.getElementById(id);
      if (!control) continue;
      block.hidden = control.type === "checkbox" ? !control.checked : control.value !== value;
    }
  }

  function closeMenusOnOutsideClick() {
    document.addEventListener("click", (event) => {
      for (const menu of document.querySelectorAll("details.menu[open]")) {
        if (!menu.contains(event.target)) menu.removeAttribute("open");
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      for (const menu of document.querySelectorAll("details.menu[open]")) menu.removeAttribute("open");
    });
  }

  function nextHeaderIndex() {
    let max = -1;
    for (const row of document.querySelectorAll(".header-row[data-index]")) {
      max = Math.max(max, Number(row.dataset.index));
    }
    return max + 1;
  }

  // No inline handlers (the panel's Content-Security-Policy runs no inline script, and a
  // name put into one would be script): forms ask data-confirm="text" before they submit,
  // data-remove-closest="selector" removes its row, data-empty="id" empties that element.
  function bindActions() {
    document.addEventListener("submit", (event) => {
      const text = event.target.dataset && event.target.dataset.confirm;
      if (text && !window.confirm(text)) event.preventDefault();
    });
    document.addEventListener("click", (event) => {
      const remover = event.target.closest("[data-remove-closest]");
      if (remover) remover.closest(remover.dataset.removeClosest).remove();
      const emptier = event.target.closest("[data-empty]");
      if (emptier) document.getElementById(emptier.dataset.empty).replaceChildren();
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    closeMenusOnOutsideClick();
    bindTabs();
    bindActions();
    document.addEventListener("change", updateShowIf);
    if (!window.htmx) { updateShowIf(); return; }
    htmx.onLoad(updateShowIf);
    // A search typed while the page was still loading is sent now, not on the next keystroke.
    for (const field of document.querySelectorAll("input[type=search]")) {
      if (field.value !== field.defaultValue) htmx.trigger(field, "search");
    }
    document.body.addEventListener("htmx:configRequest", (event) => {
      if (event.detail.elt.hasAttribute("data-next-index")) {
        event.detail.parameters.index = nextHeaderIndex();
      }
    });
    const banner = document.getElementById("request-error");
    document.body.addEventListener("htmx:beforeRequest", () => { if (banner) banner.hidden = true; });
    document.body.addEventListener("htmx:responseError", (event) => {
      if (!banner) return;
      const xhr = event.detail.xhr;
      banner.textContent = (xhr.status === 404 ? "Not found: " : "The request failed: ") +
        (xhr.responseText && xhr.responseText.length < 300 ? xhr.responseText : xhr.status + " " + xhr.statusText);
      banner.hidden = false;
    });
    document.body.addEventListener("htmx:sendError", () => {
      if (!banner) return;
      banner.textContent = "The control panel cannot be reached. Check your connection and try again.";
      banner.hidden = false;
    });
  });
})();
