// The dashboard's pages: each refreshes its panels when the server says something
// changed (server-sent events from the schedulers' event broker), sends the
// actions' forms, follows paging links and filters without reloading. No polling:
// without events, nothing is fetched.
"use strict";

(() => {
  const body = document.body;
  const base = body.dataset.base;
  const panels = document.getElementById("panels");
  const live = document.getElementById("live");
  const said = document.getElementById("said");
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
      const reply = await fetch(location.pathname + location.search, {
        headers: { Accept: "text/html", "X-Dashboard-Fragment": "1" },
        credentials: "same-origin",
      });
      if (reply.ok) {
        panels.innerHTML = await reply.text();
        drawCharts();
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

  // Charts: drawn as SVG from the numbers the page carries (no library, no CDN)
  const SVG = "http://www.w3.org/2000/svg";
  const WIDTH = 600;
  const HEIGHT = 150;
  const LEFT = 44;
  const BOTTOM = 18;

  function svg(name, attributes, parent) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) {
      element.setAttribute(key, String(value));
    }
    parent.appendChild(element);
    return element;
  }

  function roundUp(value) {
    if (value <= 0) {
      return 1;
    }
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (value <= step * power) {
        return step * power;
      }
    }
    return 10 * power;
  }

  function drawChart(figure, data) {
    const kind = figure.dataset.chart;
    const series = data[kind];
    const times = data.times;
    const names = Object.keys(series);
    const count = times.length;
    const stacked = kind === "jobs";
    let top = 0;
    for (let index = 0; index < count; index++) {
      let total = 0;
      for (const name of names) {
        const value = series[name][index] || 0;
        total = stacked ? total + value : Math.max(total, value);
      }
      top = Math.max(top, total);
    }
    top = roundUp(top);
    const chart = svg("svg", {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "plot",
      "aria-label": figure.querySelector("figcaption").textContent,
    }, figure);
    const plotWidth = WIDTH - LEFT;
    const plotHeight = HEIGHT - BOTTOM;
    const slot = plotWidth / count;
    const y = (value) => plotHeight - (value / top) * (plotHeight - 6);
    svg("line", { x1: LEFT, y1: plotHeight, x2: WIDTH, y2: plotHeight, class: "axis" }, chart);
    svg("text", { x: LEFT - 4, y: 10, class: "tick", "text-anchor": "end" }, chart).textContent = String(top);
    svg("text", { x: LEFT - 4, y: plotHeight, class: "tick", "text-anchor": "end" }, chart).textContent = "0";
    const ticks = [[0, "start"], [Math.floor(count / 2), "middle"], [count - 1, "end"]];
    for (const [index, anchor] of ticks) {
      const x = anchor === "start" ? LEFT : anchor === "end" ? WIDTH : LEFT + index * slot;
      svg("text", { x: x, y: HEIGHT - 4, class: "tick", "text-anchor": anchor }, chart)
        .textContent = times[index];
    }
    if (stacked) {
      for (let index = 0; index < count; index++) {
        let base = 0;
        for (const name of names) {
          const value = series[name][index] || 0;
          if (value > 0) {
            const bar = svg("rect", {
              x: LEFT + index * slot + slot * 0.1, width: Math.max(slot * 0.8, 1),
              y: y(base + value), height: y(base) - y(base + value), class: `bar ${name}`,
            }, chart);
            svg("title", {}, bar).textContent = `${times[index]}: ${value} ${name}`;
          }
          base += value;
        }
      }
      return;
    }
    for (const name of names) {
      let path = "";
      let pen = "M";
      series[name].forEach((value, index) => {
        if (value === null || value === undefined) {
          pen = "M";
          return;
        }
        const x = LEFT + index * slot + slot / 2;
        path += `${pen}${x.toFixed(1)},${y(value).toFixed(1)} `;
        pen = "L";
        const dot = svg("circle", { cx: x, cy: y(value), r: 2, class: `dot ${name}` }, chart);
        svg("title", {}, dot).textContent = `${times[index]}: ${value} ${name}`;
      });
      if (path) {
        svg("path", { d: path.trim(), class: `line ${name}` }, chart);
      }
    }
  }

  function drawCharts() {
    for (const group of document.querySelectorAll(".charts[data-series]")) {
      let data;
      try {
        data = JSON.parse(group.dataset.series);
      } catch (error) {
        continue;
      }
      for (const figure of group.querySelectorAll("figure[data-chart]")) {
        drawChart(figure, data);
      }
    }
    body.dataset.charts = String(Number(body.dataset.charts || 0) + 1);
  }

  drawCharts();

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
    history.replaceState(null, "", new URL(link.href));
    refresh();
  });

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-filter")) {
      return;
    }
    event.preventDefault();
    const url = new URL(form.action);
    for (const [name, value] of new FormData(form)) {
      if (value) {
        url.searchParams.set(name, String(value));
      }
    }
    history.replaceState(null, "", url);
    refresh();
  });
})();
