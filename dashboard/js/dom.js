// Building the page: elements made with the DOM, and every value put in as text, never as HTML.

export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  setProps(element, props);
  append(element, children);
  return element;
}

const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  append(element, children);
  return element;
}

function setProps(element, props) {
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "value" || name === "checked" || name === "selected") element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
}

export function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child)); // a string becomes a text node
  }
  return element;
}

export function replace(element, ...children) {
  element.replaceChildren();
  return append(element, children);
}

// Only a relative path or an http(s) address becomes a link: never `javascript:` or `data:`.
export function safeHref(url) {
  return typeof url === "string" && /^(\/(?![/\\])|https?:\/\/)/i.test(url) ? url : null;
}

const TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const DATE = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

export function clock(moment = new Date()) {
  return TIME.format(new Date(moment));
}

export function fullTime(iso) {
  return iso ? DATE.format(new Date(iso)) : "—";
}

export function ago(iso) {
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export function count(n) {
  return new Intl.NumberFormat().format(n);
}

// A modal dialog: focus moves in, Escape closes it, focus comes back where it was.
export function dialog(title, body, { wide = false, onclose } = {}) {
  const back = document.activeElement;
  const close = () => node.close();
  const node = h(
    "dialog",
    { class: wide ? "dialog wide" : "dialog", "aria-label": title },
    h("header", { class: "dialog-head" }, h("h2", {}, title), h("button", { class: "icon ghost", type: "button", "aria-label": "Close", onclick: close }, "✕")),
    h("div", { class: "dialog-body" }, body),
  );
  node.addEventListener("close", () => {
    node.remove();
    onclose?.();
    back?.focus?.();
  });
  node.addEventListener("click", (event) => event.target === node && close()); // the backdrop
  document.body.append(node);
  node.showModal();
  return node;
}

export function field(label, control, hint) {
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label), control, hint ? h("span", { class: "hint" }, hint) : null);
}

export function toast(text, kind = "info") {
  const tray = document.getElementById("toasts");
  const note = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  tray.append(note);
  setTimeout(() => note.remove(), kind === "error" ? 7000 : 3500);
}
