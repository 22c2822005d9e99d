// mlxd's chat page. It talks to the server through the public API only (/v1/models, /api/ps,
// /v1/chat/completions streamed), keeps conversations in this browser's localStorage and an
// API key, when the server needs one, in this tab's sessionStorage. Model output is put into
// the page as text nodes, never as HTML, so nothing it contains can run.
'use strict';

const $ = (selector) => document.querySelector(selector);

/** An element with properties (`class`, `on…` handlers, attributes) and children. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ---- State: conversations in localStorage, the API key in sessionStorage ----

const STORE = 'mlxd.chats';
let chats = loadChats();
let currentId = chats[0] ? chats[0].id : null;
let running = null; // {controller, chat} of the reply being streamed

function loadChats() {
  try {
    const chats = JSON.parse(localStorage.getItem(STORE) || '[]');
    return Array.isArray(chats) ? chats.filter(validChat) : [];
  } catch {
    return [];
  }
}

function validChat(c) {
  return c && typeof c.id === 'string' && Array.isArray(c.messages)
    && c.messages.every((m) => m && typeof m.role === 'string' && typeof m.content === 'string');
}

function saveChats() {
  localStorage.setItem(STORE, JSON.stringify(chats));
}

/** A new conversation, with the settings the form shows (those of the one before it). */
function newChat() {
  const chat = { id: crypto.randomUUID(), title: 'New chat', model: $('#model').value || '',
    system: $('#system').value, temperature: $('#temperature').value || 0.7, top_p: $('#top_p').value || 1,
    max_tokens: $('#max_tokens').value || null, messages: [] };
  chats.unshift(chat);
  currentId = chat.id;
  document.body.classList.remove('sidebar-open');
  saveChats();
  render();
  $('#input').focus();
}

function current() {
  return chats.find((c) => c.id === currentId) || null;
}

// ---- The API ----

async function api(path, init = {}) {
  const headers = { 'content-type': 'application/json', ...(init.headers || {}) };
  const key = sessionStorage.getItem('mlxd.key');
  if (key) headers.authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) {
    askKey();
    throw new Error('This server requires an API key.');
  }
  return response;
}

function askKey() {
  const dialog = $('#key-dialog');
  if (dialog.open) return;
  $('#key-input').value = '';
  dialog.showModal();
}

/** Fills the model picker: every model the server offers, loaded ones marked. */
async function loadModels() {
  try {
    const [models, loaded] = await Promise.all([
      api('/v1/models').then((r) => r.json()),
      api('/api/ps').then((r) => (r.ok ? r.json() : { models: [] })).catch(() => ({ models: [] })),
    ]);
    // Ollama's listing names a model with its tag (`name:latest`).
    const resident = new Set((loaded.models || []).map((m) => m.name.replace(/:latest$/, '')));
    const select = $('#model');
    const chosen = (current() && current().model) || select.value;
    select.replaceChildren(...(models.data || []).map((m) =>
      el('option', { value: m.id }, (resident.has(m.id) ? '● ' : '○ ') + m.id)));
    if (chosen && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
    setStatus(`${select.options.length} model(s), ${resident.size} loaded (●)`);
  } catch (e) {
    setStatus(e.message);
  }
}

function setStatus(text) {
  $('#status').textContent = text;
}

// ---- Sending, streaming, stopping ----

async function send(text) {
  let chat = current();
  if (!chat) {
    newChat();
    chat = current();
  }
  if (running) return;
  chat.model = $('#model').value;
  if (text !== null) {
    chat.messages.push({ role: 'user', content: text });
    if (chat.title === 'New chat') chat.title = text.slice(0, 40);
  }
  const reply = { role: 'assistant', content: '', reasoning: '', tool_calls: [], stats: null };
  chat.messages.push(reply);
  saveChats();
  render();
  const controller = new AbortController();
  running = { controller, chat };
  showRunning(true);
  const started = performance.now();
  let firstAt = null;
  // The reply is drawn at most once a frame: a fast model's deltas come faster than the page can
  // lay out a growing reply, and drawing each one starved the page (and its Stop button).
  let frame = null;
  const draw = () => {
    frame = null;
    renderMessage(reply, chat.messages.length - 1, true);
  };
  const loading = setInterval(() => {
    if (firstAt === null) setStatus(`Waiting for ${chat.model} (loading on demand, prefilling)… ${((performance.now() - started) / 1000).toFixed(0)} s`);
  }, 500);
  const body = {
    model: chat.model, stream: true, stream_options: { include_usage: true },
    messages: [...(chat.system ? [{ role: 'system', content: chat.system }] : []),
      ...chat.messages.slice(0, -1).map((m) => ({ role: m.role, content: m.content }))],
    temperature: Number(chat.temperature), top_p: Number(chat.top_p),
  };
  if (chat.max_tokens) body.max_tokens = Number(chat.max_tokens);
  try {
    const response = await api('/v1/chat/completions', { method: 'POST', body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta) {
        if (firstAt === null && (delta.content || delta.reasoning_content)) firstAt = performance.now();
        reply.content += delta.content || '';
        reply.reasoning += delta.reasoning_content || '';
        for (const call of delta.tool_calls || []) {
          const slot = reply.tool_calls[call.index] || (reply.tool_calls[call.index] = { name: '', arguments: '' });
          slot.name += (call.function && call.function.name) || '';
          slot.arguments += (call.function && call.function.arguments) || '';
        }
        if (frame === null) frame = requestAnimationFrame(draw);
      }
      if (event.usage) {
        const seconds = (performance.now() - (firstAt || started)) / 1000;
        reply.stats = { tokens: event.usage.completion_tokens, ttft_ms: Math.round((firstAt || performance.now()) - started),
          tok_s: event.usage.completion_tokens / Math.max(seconds, 1e-3),
          cached: (event.usage.prompt_tokens_details && event.usage.prompt_tokens_details.cached_tokens) || 0 };
      }
    }
    setStatus('');
  } catch (e) {
    if (e.name === 'AbortError') {
      reply.stopped = true;
      setStatus('Stopped');
    } else {
      reply.error = e.message;
      setStatus(e.message);
    }
  } finally {
    if (frame !== null) cancelAnimationFrame(frame);
    clearInterval(loading);
    running = null;
    showRunning(false);
    saveChats();
    render();
    loadModels();
  }
}

/** The JSON events of a server-sent event stream (`data:` lines), until `[DONE]`. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') return;
        yield JSON.parse(data);
      }
    }
  }
}

function stop() {
  if (running) running.controller.abort();
}

function showRunning(on) {
  $('#send').hidden = on;
  $('#stop').hidden = !on;
}

// ---- Rendering ----

function render() {
  renderList();
  const chat = current();
  const messages = $('#messages');
  messages.replaceChildren();
  const settings = chat || { system: '', temperature: 0.7, top_p: 1, max_tokens: null };
  $('#system').value = settings.system || '';
  $('#temperature').value = settings.temperature;
  $('#top_p').value = settings.top_p;
  $('#max_tokens').value = settings.max_tokens || '';
  if (!chat) return;
  if (chat.model && [...$('#model').options].some((o) => o.value === chat.model)) $('#model').value = chat.model;
  chat.messages.forEach((m, i) => renderMessage(m, i, false));
}

function renderList() {
  const list = $('#chat-list');
  list.replaceChildren(...chats.map((c) => el('li', { class: c.id === currentId ? 'current' : '' },
    el('button', { class: 'title', type: 'button', title: c.title, onclick: () => { currentId = c.id; document.body.classList.remove('sidebar-open'); render(); } }, c.title),
    el('button', { type: 'button', 'aria-label': `Rename ${c.title}`, onclick: () => rename(c) }, '✎'),
    el('button', { type: 'button', 'aria-label': `Delete ${c.title}`, onclick: () => remove(c) }, '✕'))));
}

function rename(chat) {
  const title = prompt('Rename the conversation', chat.title);
  if (title) {
    chat.title = title;
    saveChats();
    renderList();
  }
}

function remove(chat) {
  chats = chats.filter((c) => c !== chat);
  if (currentId === chat.id) currentId = chats[0] ? chats[0].id : null;
  saveChats();
  render();
}

/** Draws message `index` (replacing its old node while it streams). */
function renderMessage(m, index, live) {
  const node = el('div', { class: `msg ${m.role}${m.error ? ' error' : ''}`, 'data-index': String(index) });
  if (m.role === 'user') {
    node.append(m.content, el('div', { class: 'meta' },
      el('button', { type: 'button', onclick: () => edit(index) }, 'Edit')));
  } else {
    if (m.reasoning) {
      node.append(el('details', { class: 'thought' }, el('summary', {}, live && !m.content ? 'Thinking…' : 'Thought'),
        el('div', {}, m.reasoning)));
    }
    node.append(...markdown(m.content));
    for (const call of m.tool_calls || []) node.append(el('div', { class: 'tool-call' }, `⚙ ${call.name}(${call.arguments})`));
    const meta = el('div', { class: 'meta' });
    if (m.stats) {
      meta.append(el('span', {}, `${m.stats.tokens} tokens · ${m.stats.tok_s.toFixed(1)} tok/s · first token ${m.stats.ttft_ms} ms · ${m.stats.cached} cached`));
    }
    if (m.stopped) meta.append(el('span', {}, 'stopped'));
    if (m.error) meta.append(el('span', {}, m.error));
    const chat = current();
    if (!live && chat && index === chat.messages.length - 1) {
      meta.append(el('button', { type: 'button', onclick: regenerate }, 'Regenerate'));
    }
    node.append(meta);
  }
  const messages = $('#messages');
  const old = messages.querySelector(`[data-index="${index}"]`);
  if (old) old.replaceWith(node);
  else messages.append(node);
  if (live) messages.scrollTop = messages.scrollHeight;
}

/** Markdown as DOM nodes: fenced code blocks (with a copy button), headings, lists,
 * paragraphs, inline code, bold and italics. Text stays text: no HTML is ever parsed. */
function markdown(text) {
  const nodes = [];
  const parts = text.split(/^```[^\n]*\n?/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const code = part.replace(/\n$/, '');
      nodes.push(el('pre', {}, el('button', { class: 'copy', type: 'button',
        onclick: (e) => { navigator.clipboard.writeText(code); e.target.textContent = 'Copied'; } }, 'Copy'), el('code', {}, code)));
      return;
    }
    for (const block of part.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.split('\n');
      const heading = /^(#{1,6})\s+(.*)$/.exec(lines[0]);
      if (heading && lines.length === 1) {
        nodes.push(el(`h${Math.min(heading[1].length + 2, 6)}`, {}, ...inline(heading[2])));
      } else if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l))) {
        const ordered = /^\s*\d+\./.test(lines[0]);
        nodes.push(el(ordered ? 'ol' : 'ul', {}, ...lines.map((l) => el('li', {}, ...inline(l.replace(/^\s*([-*]|\d+\.)\s+/, ''))))));
      } else {
        const p = el('p');
        lines.forEach((l, j) => { if (j) p.append(el('br')); p.append(...inline(l)); });
        nodes.push(p);
      }
    }
  });
  return nodes;
}

/** Inline code, **bold** and *italics* as nodes; everything else as text. */
function inline(text) {
  const out = [];
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    out.push(text.slice(last, match.index));
    const token = match[0];
    if (token.startsWith('`')) out.push(el('code', {}, token.slice(1, -1)));
    else if (token.startsWith('**')) out.push(el('strong', {}, token.slice(2, -2)));
    else out.push(el('em', {}, token.slice(1, -1)));
    last = match.index + token.length;
  }
  out.push(text.slice(last));
  return out.filter((s) => s !== '');
}

// ---- Edit, regenerate, settings, import and export ----

function edit(index) {
  const chat = current();
  if (!chat || running) return;
  $('#input').value = chat.messages[index].content;
  chat.messages = chat.messages.slice(0, index);
  saveChats();
  render();
  $('#input').focus();
}

function regenerate() {
  const chat = current();
  if (!chat || running) return;
  chat.messages.pop();
  send(null);
}

function readSettings() {
  const chat = current();
  if (!chat) return;
  chat.system = $('#system').value;
  chat.temperature = $('#temperature').value || 0.7;
  chat.top_p = $('#top_p').value || 1;
  chat.max_tokens = $('#max_tokens').value || null;
  saveChats();
}

function exportChats() {
  const blob = new Blob([JSON.stringify(chats, null, 2)], { type: 'application/json' });
  const link = el('a', { href: URL.createObjectURL(blob), download: 'mlxd-chats.json' });
  link.click();
  URL.revokeObjectURL(link.href);
}

async function importChats(file) {
  try {
    const imported = JSON.parse(await file.text());
    const valid = (Array.isArray(imported) ? imported : [imported]).filter(validChat);
    const known = new Set(chats.map((c) => c.id));
    chats = [...valid.filter((c) => !known.has(c.id)), ...chats];
    currentId = valid[0] ? valid[0].id : currentId;
    saveChats();
    render();
    setStatus(`Imported ${valid.length} conversation(s)`);
  } catch (e) {
    setStatus(`Import failed: ${e.message}`);
  }
}

function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === 'dark'
    : matchMedia('(prefers-color-scheme: dark)').matches;
  document.documentElement.dataset.theme = dark ? 'light' : 'dark';
  localStorage.setItem('mlxd.theme', document.documentElement.dataset.theme);
}

// ---- Wiring ----

document.addEventListener('DOMContentLoaded', () => {
  const theme = localStorage.getItem('mlxd.theme');
  if (theme) document.documentElement.dataset.theme = theme;
  $('#new-chat').addEventListener('click', newChat);
  $('#composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('#input').value.trim();
    if (!text || running) return;
    $('#input').value = '';
    send(text);
  });
  $('#input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('#composer').requestSubmit();
    }
  });
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape') stop(); });
  $('#stop').addEventListener('click', stop);
  $('#model').addEventListener('change', () => { const chat = current(); if (chat) { chat.model = $('#model').value; saveChats(); } });
  $('#settings-toggle').addEventListener('click', () => {
    const section = $('#settings');
    section.hidden = !section.hidden;
    $('#settings-toggle').setAttribute('aria-expanded', String(!section.hidden));
  });
  for (const id of ['#system', '#temperature', '#top_p', '#max_tokens']) $(id).addEventListener('change', readSettings);
  $('#export').addEventListener('click', exportChats);
  $('#import').addEventListener('change', (e) => { if (e.target.files[0]) importChats(e.target.files[0]); e.target.value = ''; });
  $('#theme').addEventListener('click', toggleTheme);
  $('#toggle-sidebar').addEventListener('click', () => document.body.classList.toggle('sidebar-open'));
  $('#key-dialog').addEventListener('close', () => {
    const key = $('#key-input').value.trim();
    if (key) {
      sessionStorage.setItem('mlxd.key', key);
      loadModels();
    }
  });
  loadModels().then(render);
});
