// The frame around every view: brand, navigation, the connection's state, the bell, sign-out.

import { h, replace } from "./dom.js";
import { logo } from "./icons.js";
import { notifications } from "./notifications.js";

const STATES = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  busy: "Too many streams: waiting",
  "signed-out": "Signed out",
};

export function connectionBadge(stream) {
  const label = h("span", {}, STATES[stream.state] ?? stream.state);
  const badge = h("span", { class: "conn", role: "status", dataset: { state: stream.state } }, h("span", { class: "dot", "aria-hidden": "true" }), label);
  const off = stream.on("state", (state) => {
    badge.dataset.state = state;
    label.textContent = STATES[state] ?? state;
  });
  return { element: badge, off };
}

export function shell(root, { access, stream, onSignOut }) {
  const main = h("main", { id: "view", class: "view", tabindex: "-1" });
  const bell = notifications(stream);
  const nav = h("nav", { class: "nav", "aria-label": "Main" }, h("a", { href: "#/queues", class: "nav-link" }, "Queues"));
  const bar = h(
    "header",
    { class: "topbar" },
    h("a", { class: "brand", href: "#/queues" }, logo(), h("span", {}, "Pombo")),
    nav,
    h("div", { class: "topbar-end" },
      connectionBadge(stream).element,
      bell.button,
      h("span", { class: "who", title: access.scopes.join(" ") }, access.subject),
      h("button", { class: "small ghost", type: "button", onclick: onSignOut }, "Sign out"),
    ),
  );
  const skip = h("a", { class: "skip", href: "#view", onclick: (event) => (event.preventDefault(), main.focus()) }, "Skip to content");
  replace(root, skip, bar, main, bell.panel);
  return { main, nav };
}
