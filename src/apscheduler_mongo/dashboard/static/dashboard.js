// The dashboard's page: refreshes its panels when the server says something
// changed (server-sent events from the schedulers' event broker), and sends the
// actions' forms without reloading. No polling: without events, nothing is fetched.
"use strict";

(() => {
  const body = document.body;
  const base = body.dataset.base;
  const panels = document.getElementById("panels");
  const live = document.getElementById("live");
  const said = document.getElementById("said");
  let query = body.dataset.query || "";
  let timer = null;
  let fetching = false;
  let again = false;

  async function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const reply = await fetch(base + "panels" + query, {
        headers: { Accept: "text/html" },
        credentials: "same-origin",
      });
      if (reply.ok) {
        panels.innerHTML = await reply.text();
        body.dataset.refreshes = String(Number(body.dataset.refreshes || 0) + 1);
      }
    } catch (error) {
      live.textContent = "offline";
      live.className = "live off";
    } finally {
      fetching = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  function refreshSoon() {
    if (timer === null) {
      timer = setTimeout(() => {
        timer = null;
        refresh();
      }, 50);
    }
  }

  let opened = false;
  const events = new EventSource(base + "events");
  events.addEventListener("open", () => {
    live.textContent = "live";
    live.className = "live on";
    if (opened) {
      refreshSoon(); // reconnected: catch up with what was missed
    }
    opened = true;
  });
  events.addEventListener("change", refreshSoon);
  events.addEventListener("error", () => {
    live.textContent = "reconnecting";
    live.className = "live off";
  });

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-action")) {
      return;
    }
    event.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      return;
    }
    let message;
    try {
      const reply = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      message = (await reply.json()).message;
    } catch (error) {
      message = "the action could not be sent: " + error;
    }
    said.textContent = message;
    refresh();
  });

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-page]");
    if (link === null) {
      return;
    }
    event.preventDefault();
    const url = new URL(link.href);
    query = url.search;
    history.replaceState(null, "", url);
    refresh();
  });
})();
