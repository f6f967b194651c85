// The few icons the page draws, as SVG elements (no icon font, nothing from another host).

import { svg } from "./dom.js";

function icon(paths, size = 18) {
  return svg(
    "svg",
    { viewBox: "0 0 24 24", width: size, height: size, fill: "none", stroke: "currentColor", "stroke-width": 1.8, "stroke-linecap": "round", "stroke-linejoin": "round", "aria-hidden": "true" },
    ...paths.map((d) => svg("path", { d })),
  );
}

export const bell = () => icon(["M6 8a6 6 0 1 1 12 0c0 7 3 9 3 9H3s3-2 3-9", "M10.3 21a1.94 1.94 0 0 0 3.4 0"]);
export const plus = () => icon(["M12 5v14", "M5 12h14"], 16);
export const download = () => icon(["M12 3v12", "M7 10l5 5 5-5", "M5 21h14"], 16);
export const send = () => icon(["M22 2 11 13", "M22 2 15 22l-4-9-9-4z"], 16);
export const redo = () => icon(["M3 12a9 9 0 1 0 3-6.7", "M3 4v5h5"], 16);

export function logo() {
  return svg(
    "svg",
    { viewBox: "0 0 32 32", width: 26, height: 26, "aria-hidden": "true", class: "logo" },
    svg("rect", { x: 1, y: 1, width: 30, height: 30, rx: 8, class: "logo-bg" }),
    svg("path", { d: "M8 19c3-1 5-4 6-8 1 3 3 4 6 4l4-3-1 5c-1 3-4 5-8 5-3 0-5-1-7-3z", class: "logo-bird" }),
    svg("circle", { cx: 20.5, cy: 13, r: 1, class: "logo-eye" }),
  );
}
