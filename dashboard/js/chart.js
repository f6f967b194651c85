// A small live chart: published and acked per second over the last minutes, as two SVG lines.

import { h, replace, svg } from "./dom.js";

export function throughputChart({ width = 160, height = 36 } = {}) {
  const area = svg("polygon", { class: "area", points: "" });
  const published = svg("polyline", { class: "line published", points: "" });
  const acked = svg("polyline", { class: "line acked", points: "" });
  const baseline = svg("line", { class: "baseline", x1: 0, x2: width, y1: height - 1, y2: height - 1 });
  const title = svg("title", {}, "published and acked per second, last 5 minutes");
  const element = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", preserveAspectRatio: "none" }, title, baseline, area, published, acked);

  function draw(series) {
    const top = Math.max(1, ...series.published, ...series.acked);
    const points = (values) =>
      values.map((value, i) => `${((i / (values.length - 1)) * width).toFixed(1)},${(height - 2 - (value / top) * (height - 4)).toFixed(1)}`).join(" ");
    published.setAttribute("points", points(series.published));
    area.setAttribute("points", `0,${height - 1} ${points(series.published)} ${width},${height - 1}`);
    acked.setAttribute("points", points(series.acked));
    title.textContent = `published and acked per second over the last 5 minutes (peak ${top.toFixed(1)}/s)`;
  }
  return { element, draw };
}

// "● 12.4/s in · ● 11.9/s out", the legend of the chart beside it.
export function legend(element, series, words = ["in", "out"]) {
  replace(element,
    h("span", { class: "legend published", "aria-hidden": "true" }), `${rate(series.published)} ${words[0]}`, " · ",
    h("span", { class: "legend acked", "aria-hidden": "true" }), `${rate(series.acked)} ${words[1]}`);
}

// "12.4/s" from the most recent full buckets.
export function rate(values, buckets = 3) {
  const recent = values.slice(-buckets);
  const value = recent.reduce((sum, v) => sum + v, 0) / recent.length;
  return value >= 10 ? `${Math.round(value)}/s` : `${value.toFixed(1)}/s`;
}
