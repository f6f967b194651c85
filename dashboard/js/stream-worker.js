// The SharedWorker that holds the browser's one connection for every open dashboard tab.

import { Connection } from "./connection.js";

const ports = new Set();
const connection = new Connection((message) => {
  for (const port of ports) port.postMessage(message);
});

self.onconnect = (event) => {
  const port = event.ports[0];
  ports.add(port);
  port.onmessage = ({ data }) => handle(port, data);
  port.start();
};

function handle(port, message) {
  if (message.kind === "hello") port.postMessage(connection.snapshot());
  else if (message.kind === "plan") connection.follow(message.plan);
  else if (message.kind === "view") connection.view(message.tab, message.queue);
  else if (message.kind === "replan") connection.replan();
  else if (message.kind === "stop") connection.signedOut("you signed out");
  else if (message.kind === "bye") ports.delete(port), connection.view(message.tab, null);
}
