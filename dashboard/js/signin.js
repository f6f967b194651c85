// Signing in: a pasted token is traded for an HttpOnly session cookie (the page never keeps it).

import { api } from "./api.js";
import { h, replace } from "./dom.js";
import { logo } from "./icons.js";

export function signInView(root, { message, onSignedIn }) {
  const token = h("textarea", { id: "token", name: "token", rows: 4, required: true, autocomplete: "off", spellcheck: "false", placeholder: "eyJhbGciOi…" });
  const problem = h("p", { class: "form-error", role: "alert", hidden: !message }, message ?? "");
  const submit = h("button", { class: "primary wide", type: "submit" }, "Sign in");
  const form = h(
    "form",
    { class: "signin-card", onsubmit: (event) => send(event) },
    h("div", { class: "signin-brand" }, logo(), h("span", {}, "Pombo")),
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste a token. The server keeps your session in a cookie this page cannot read, so the token never appears in a URL."),
    problem,
    h("label", { class: "field", for: "token" }, h("span", { class: "field-label" }, "Token"), token),
    submit,
    h("p", { class: "hint" }, "No token yet? An admin makes one with ", h("code", {}, 'python main.py token --sub you --scope "subscribe:*"'), "."),
  );

  async function send(event) {
    event.preventDefault();
    submit.disabled = true;
    problem.hidden = true;
    try {
      const me = await api("/session", { method: "POST", json: { token: token.value.trim() } });
      onSignedIn(me);
    } catch (error) {
      replace(problem, error.status === 401 ? `That token does not work: ${error.message}.` : error.message);
      problem.hidden = false;
      token.focus();
    } finally {
      submit.disabled = false;
    }
  }

  replace(root, h("main", { class: "signin" }, form));
  token.focus();
}
