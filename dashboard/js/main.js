// The dashboard: sign in, then the views, all fed by the browser's one event stream.

import { Access } from "./access.js";
import { api, onSignedOut } from "./api.js";
import { queueView } from "./queue.js";
import { queuesView } from "./queues.js";
import { shell } from "./shell.js";
import { signInView } from "./signin.js";
import { Stream } from "./stream.js";
import { toast } from "./dom.js";

const root = document.getElementById("app");
const stream = new Stream();
let session = null; // {access, stream, main, unmount}

const ENDED = {
  "the token expired": "Your token expired. Paste a new one to carry on.",
  "the token was revoked": "Your token was revoked. Ask an admin for a new one.",
  "the token is invalid or expired": "Your token is no longer valid (expired?). Paste a new one to carry on.",
  "you signed out": "You signed out.",
};

function showSignIn(message) {
  session?.unmount?.();
  session = null;
  document.title = "Sign in · Pombo";
  signInView(root, { message, onSignedIn: start });
}

function end(reason) {
  if (!session) return;
  stream.stop();
  api("/session", { method: "DELETE" }).catch(() => {});
  showSignIn(ENDED[reason] ?? `Your session ended: ${reason}. Sign in again.`);
}

// What the one stream follows: the token's subscribe patterns and the queues it names one by one
// (the stream takes on such a queue once it is created), plus its notifications. Past the
// server's bound on logs the connection follows less (overview, connection.js).
function planFor(access) {
  return { subject: access.subject, queues: access.patterns(), notifications: true };
}

function start(me) {
  const access = new Access(me);
  const plan = planFor(access);
  session = { access, stream, unmount: null };
  const { main } = shell(root, { access, stream, onSignOut: signOut });
  session.main = main;
  stream.follow(plan);
  route();
}

async function signOut() {
  stream.stop();
  await api("/session", { method: "DELETE" }).catch(() => {});
  session?.unmount?.();
  session = null;
  showSignIn("You signed out.");
}

function route() {
  if (!session) return;
  session.unmount?.();
  const [, view, name, , messageId] = location.hash.replace(/^#\/?/, "/").split("/").map(decodeURIComponent);
  const viewing = view === "queues" && name ? name : null;
  stream.view(viewing && session.access.can("subscribe", viewing) ? viewing : null);
  if (viewing) {
    document.title = `${name} · Pombo`;
    session.unmount = queueView(session.main, session, name, messageId);
  } else {
    document.title = "Queues · Pombo";
    session.unmount = queuesView(session.main, session);
  }
  for (const link of document.querySelectorAll(".nav-link")) link.toggleAttribute("aria-current", view !== "queues" || !name);
}

onSignedOut((message) => end(message));
stream.on("signed-out", (message) => end(message));
stream.on("problem", (message) => toast(`Live updates paused: ${message}`, "error"));
addEventListener("hashchange", route);
api("/session").then(
  ({ me, ended }) => (me ? start(me) : showSignIn(ended ? ENDED[ended] ?? `Your session ended: ${ended}.` : undefined)),
  (error) => showSignIn(error.message),
);
