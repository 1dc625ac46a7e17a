// chatsrv's page: the conversations, replies rendered as they stream, and the server's promise
// made visible. A reload or a broken connection resumes a reply from the last character shown
// (Last-Event-ID); Stop cancels it wherever it runs; a reply that ended early says how, and can
// be continued. No build step, no dependency: fetch, a small Server-Sent Events reader (an
// EventSource cannot POST nor send a key), and a renderer that builds DOM nodes from text and
// never parses HTML from the model.

const KEY = "chatsrv.key"; // localStorage: the API key, when the server asks for one
const REPLY = "chatsrv.reply."; // sessionStorage + message id: {offset, text} shown so far
const CONTINUABLE = new Set(["interrupted", "cancelled", "timed_out", "failed"]);
const RETRY_MS = [250, 500, 1000, 2000, 4000]; // reconnecting a broken stream, then every 4 s
// A reply whose page goes away (a reload, a closed tab, a lost network) goes on this long for
// the page to come back to it, then stops as interrupted/resume_grace_expired.
const ON_DISCONNECT = { grace_s: 10 };

const $ = (selector) => document.querySelector(selector);
const nav = $("#conversations");
const log = $("#messages");
const input = $("#input");
const stopButton = $("#stop");
const notice = $("#notice");

let current = null; // the open conversation's id
const streams = new Map(); // message id -> Reply being streamed by this page

class Unauthorized extends Error {}

// -- The API ---------------------------------------------------------------------------------

async function api(method, path, { body, headers = {} } = {}) {
  const key = localStorage.getItem(KEY);
  const all = { ...headers };
  if (key) all.Authorization = `Bearer ${key}`;
  if (body !== undefined) all["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers: all,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    askForKey();
    throw new Unauthorized("an API key is needed");
  }
  return response;
}

async function json(method, path, options) {
  const response = await api(method, path, options);
  if (!response.ok) throw new Error(await problem(response));
  return response.status === 204 ? null : response.json();
}

async function problem(response) {
  try {
    const { error } = await response.json();
    return `${error.message} (${response.status})`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Server-Sent Events from a fetch response, as {event, data, id}: events are separated by a
// blank line, `data` is JSON, comments (": ping") are skipped. chatsrv ends lines with \n.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: [], id: null };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.event = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
      }
      if (event.data.length) {
        yield { event: event.event, data: JSON.parse(event.data.join("\n")), id: event.id };
      }
    }
  }
}

// -- Rendering -------------------------------------------------------------------------------

// Text with a little Markdown (paragraphs, fenced code blocks, lists, `code`, **bold**) as DOM
// nodes. Everything from the model goes in as text: no HTML it sends is ever parsed.
function render(text) {
  const root = document.createDocumentFragment();
  const parts = text.split(/^```[^\n]*\n?/m);
  parts.forEach((part, index) => {
    if (index % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/\n$/, "");
      pre.append(code);
      root.append(pre);
      return;
    }
    for (const block of part.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.replace(/^\n+|\n+$/g, "").split("\n");
      const bullet = /^\s*[-*] /;
      const number = /^\s*\d+[.)] /;
      if (lines.every((line) => bullet.test(line)) || lines.every((line) => number.test(line))) {
        const list = document.createElement(bullet.test(lines[0]) ? "ul" : "ol");
        for (const line of lines) {
          const item = document.createElement("li");
          item.append(inline(line.replace(bullet, "").replace(number, "")));
          list.append(item);
        }
        root.append(list);
      } else {
        const paragraph = document.createElement("p");
        lines.forEach((line, i) => {
          if (i) paragraph.append(document.createElement("br"));
          paragraph.append(inline(line));
        });
        root.append(paragraph);
      }
    }
  });
  return root;
}

function inline(text) {
  const fragment = document.createDocumentFragment();
  for (const piece of text.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/)) {
    if (piece.startsWith("`") && piece.endsWith("`") && piece.length > 2) {
      const code = document.createElement("code");
      code.textContent = piece.slice(1, -1);
      fragment.append(code);
    } else if (piece.startsWith("**") && piece.endsWith("**") && piece.length > 4) {
      const strong = document.createElement("strong");
      strong.textContent = piece.slice(2, -2);
      fragment.append(strong);
    } else if (piece) {
      fragment.append(document.createTextNode(piece));
    }
  }
  return fragment;
}
window.chatsrvRender = render; // for the tests of what it makes of hostile text

function article(message) {
  let node = log.querySelector(`article[data-id="${message.id}"]`);
  if (!node) {
    node = document.createElement("article");
    node.className = "message";
    node.dataset.id = message.id;
    node.dataset.role = message.role;
    const content = document.createElement("div");
    content.className = "content";
    const meta = document.createElement("div");
    meta.className = "meta";
    node.append(content, meta);
    log.append(node);
  }
  return node;
}

function show(node, { content, status, stop_reason: stopReason, error }) {
  node.dataset.status = status;
  const target = node.querySelector(".content");
  if (node.dataset.role === "assistant") target.replaceChildren(render(content));
  else target.textContent = content;
  const meta = node.querySelector(".meta");
  meta.replaceChildren();
  if (node.dataset.role === "assistant" && CONTINUABLE.has(status)) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = status.replace("_", " ");
    badge.title = stopReason || "";
    const again = document.createElement("button");
    again.type = "button";
    again.className = "continue";
    again.textContent = "Continue";
    again.addEventListener("click", () => continueReply(node.dataset.id));
    meta.append(badge, again);
  }
  if (error) {
    const text = document.createElement("span");
    text.className = "error";
    text.textContent = error;
    meta.append(text);
  }
}

function say(text) {
  notice.textContent = text || "";
  notice.hidden = !text;
}

function scrollDown() {
  log.scrollTop = log.scrollHeight;
}

// -- Replies ---------------------------------------------------------------------------------

// One reply this page streams: what it has shown, and where its stream is.
class Reply {
  constructor(messageId, conversationId, text = "", offset = 0) {
    this.id = messageId;
    this.conversationId = conversationId;
    this.text = text;
    this.offset = offset; // the last delta's id: characters of the reply so far
    this.pending = false;
    this.finished = false;
  }

  save() {
    const state = JSON.stringify({ offset: this.offset, text: this.text });
    sessionStorage.setItem(REPLY + this.id, state);
  }

  // Render at most once a frame, however fast the deltas come.
  paint() {
    if (this.pending || this.conversationId !== current) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      // A frame can come after `done` (a hidden tab gets none until it shows again).
      if (this.finished || this.conversationId !== current) return;
      show(article({ id: this.id, role: "assistant" }), { content: this.text, status: "streaming" });
      scrollDown();
    });
  }
}

// Read a reply's events (`stream`, or none yet) to its `done`; a stream that breaks first is
// resumed from the last character shown, until it ends.
async function follow(stream, reply) {
  streams.set(reply.id, reply);
  updateStop();
  try {
    for (let attempt = 0; ; attempt++) {
      if (stream) {
        if (await consume(stream, reply)) return;
        say("Reconnecting…");
        await sleep(RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)]);
      }
      stream = await resume(reply);
      if (!stream) await sleep(RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)]);
    }
  } finally {
    streams.delete(reply.id);
    updateStop();
  }
}

async function consume(stream, reply) {
  try {
    for await (const event of stream) {
      say("");
      if (event.event === "delta") {
        reply.text += event.data.content;
        reply.offset = Number(event.id);
        reply.save();
        reply.paint();
      } else if (event.event === "done") {
        reply.finished = true;
        sessionStorage.removeItem(REPLY + reply.id);
        const message = await json("GET", `/v1/messages/${reply.id}`).catch(() => null);
        if (reply.conversationId === current) {
          show(article({ id: reply.id, role: "assistant" }), {
            content: message ? message.content : reply.text,
            status: event.data.status,
            stop_reason: event.data.stop_reason,
            error: message?.error,
          });
        }
        return true;
      }
    }
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
  }
  return false; // the stream broke before `done`
}

async function resume(reply) {
  try {
    const response = await api("GET", `/v1/messages/${reply.id}/events`, {
      headers: { "Last-Event-ID": String(reply.offset) },
    });
    if (response.ok) return events(response);
    if (response.status === 400 || response.status === 404) {
      // The server keeps less than was shown (a crash lost the last moments), or the reply is
      // gone: show what it has.
      sessionStorage.removeItem(REPLY + reply.id);
      const message = await json("GET", `/v1/messages/${reply.id}`).catch(() => null);
      if (message && message.status !== "streaming") {
        if (reply.conversationId === current) show(article(message), message);
        throw new Finished();
      }
      if (!message) throw new Finished();
      reply.text = message.content;
      reply.offset = [...message.content].length; // offsets count characters, not UTF-16 units
    }
  } catch (error) {
    if (error instanceof Finished || error instanceof Unauthorized) throw error;
  }
  return null; // the server does not answer yet
}

class Finished extends Error {}

async function send(content) {
  if (!current) {
    const title = content.trim().split("\n")[0].slice(0, 60);
    const conversation = await json("POST", "/v1/conversations", { body: { title } });
    await loadConversations();
    await open(conversation.id);
  }
  const conversationId = current;
  const response = await api("POST", `/v1/conversations/${conversationId}/messages`, {
    body: { content, on_disconnect: ON_DISCONNECT },
  });
  if (!response.ok) {
    say(await problem(response));
    return;
  }
  // The first event names both messages: show the user's, then stream the reply.
  const stream = events(response);
  const first = await stream.next();
  if (first.done || first.value.event !== "start") return;
  const start = first.value.data;
  show(article({ id: start.user_message_id, role: "user" }), { content, status: "complete" });
  show(article({ id: start.message_id, role: "assistant" }), { content: "", status: "streaming" });
  scrollDown();
  await guard(follow(stream, new Reply(start.message_id, conversationId)));
}

// The same message goes on: its stream starts after its stored content.
async function continueReply(messageId) {
  const message = await json("GET", `/v1/messages/${messageId}`);
  const response = await api("POST", `/v1/messages/${messageId}/continue`, {
    body: { on_disconnect: ON_DISCONNECT },
  });
  if (!response.ok) {
    say(await problem(response));
    return;
  }
  const stream = events(response);
  await stream.next(); // `start`
  const reply = new Reply(messageId, message.conversation_id, message.content);
  reply.offset = [...message.content].length; // offsets count characters, not UTF-16 units
  show(article(message), { content: reply.text, status: "streaming" });
  await guard(follow(stream, reply));
}

async function stop() {
  for (const reply of streams.values()) {
    if (reply.conversationId === current) {
      await guard(json("POST", `/v1/messages/${reply.id}/cancel`));
    }
  }
}

function updateStop() {
  stopButton.hidden = ![...streams.values()].some((reply) => reply.conversationId === current);
}

// -- Conversations ---------------------------------------------------------------------------

// The sidebar: the conversations, newest first, those with a reply streaming now marked (on
// whichever process or tab it runs).
async function loadConversations() {
  const { conversations } = await json("GET", "/v1/conversations");
  const { turns } = await json("GET", "/v1/turns");
  const busy = new Set(turns.map((turn) => turn.conversation_id));
  nav.replaceChildren(
    ...conversations.map((conversation) => {
      const item = document.createElement("li");
      item.dataset.id = conversation.id;
      item.setAttribute("aria-busy", String(busy.has(conversation.id)));
      item.setAttribute("aria-current", String(conversation.id === current));
      const openButton = document.createElement("button");
      openButton.type = "button";
      openButton.className = "open";
      openButton.textContent = conversation.title || "New conversation";
      openButton.addEventListener("click", () => guard(open(conversation.id)));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete";
      remove.textContent = "×";
      remove.setAttribute("aria-label", "Delete conversation");
      remove.addEventListener("click", () => guard(removeConversation(conversation)));
      item.append(openButton, remove);
      return item;
    }),
  );
}

async function open(conversationId) {
  current = conversationId;
  history.replaceState(null, "", conversationId ? `#c=${conversationId}` : "#");
  for (const item of nav.children) {
    item.setAttribute("aria-current", String(item.dataset.id === conversationId));
  }
  log.replaceChildren();
  updateStop();
  if (!conversationId) return;
  const { messages } = await json("GET", `/v1/conversations/${conversationId}/messages`);
  for (const message of messages) {
    const node = article(message);
    if (message.status !== "streaming") {
      show(node, message);
      continue;
    }
    // A reply still streaming: go on from what this tab showed before a reload, if it did,
    // else from its start. (A row left 'streaming' by a crash, not among the running turns, is
    // followed too: the server ends it once its lease expires.)
    const saved = JSON.parse(sessionStorage.getItem(REPLY + message.id) || "null");
    const reply = new Reply(message.id, conversationId, saved?.text ?? "", saved?.offset ?? 0);
    show(node, { content: reply.text, status: "streaming" });
    if (!streams.has(message.id)) guard(follow(null, reply)); // unless this page streams it
  }
  scrollDown();
  input.focus();
}

async function removeConversation(conversation) {
  const title = conversation.title || "this conversation";
  if (!confirm(`Delete ${title}? Its messages go with it.`)) return;
  await json("DELETE", `/v1/conversations/${conversation.id}`);
  if (conversation.id === current) await open(null);
  await loadConversations();
}

// -- Keys ------------------------------------------------------------------------------------

function askForKey() {
  const dialog = $("#key-dialog");
  if (!dialog.open) dialog.showModal();
}

$("#key-dialog").addEventListener("close", () => {
  const key = $("#key").value.trim();
  if (key) localStorage.setItem(KEY, key);
  $("#key").value = "";
  guard(start());
});

// -- Wiring ----------------------------------------------------------------------------------

async function guard(promise) {
  try {
    return await promise;
  } catch (error) {
    if (!(error instanceof Unauthorized) && !(error instanceof Finished)) {
      say(error.message);
      console.error(error);
    }
  }
  return undefined;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = input.value;
  if (!content.trim()) return;
  input.value = "";
  input.focus();
  guard(send(content));
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("#composer").requestSubmit();
  }
});

stopButton.addEventListener("click", () => guard(stop()));
$("#new").addEventListener("click", () =>
  guard(
    (async () => {
      const conversation = await json("POST", "/v1/conversations", { body: {} });
      await loadConversations();
      await open(conversation.id);
    })(),
  ),
);

async function start() {
  await loadConversations();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("c");
  const known = [...nav.children].some((item) => item.dataset.id === wanted);
  await open(known ? wanted : null);
  document.body.dataset.ready = "true";
}

guard(start());
