// sluice dashboard: polls dashboard/data with the admin token and draws it.
// No dependencies, no build step. Keys and names come from callers, so every text
// goes into the page through textContent, never as HTML.
'use strict';
(function () {
  const TOKEN_KEY = 'sluice-admin-token';
  const POLL_MS = 2000;
  const MINUTES = 60;
  const SVG = 'http://www.w3.org/2000/svg';
  let token = null;
  let timer = null;

  function $(id) { return document.getElementById(id); }

  // An element with attributes and children (strings become text nodes).
  function el(tag, attrs, children, ns) {
    const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children || []) {
      node.append(typeof child === 'string' || typeof child === 'number' ? String(child) : child);
    }
    return node;
  }

  function setStatus(state, text) {
    const status = $('status');
    status.dataset.state = state;
    status.textContent = text;
  }

  // The token from #token=... (removed from the address bar at once) or this tab's storage.
  function takeToken() {
    const match = /^#token=(.+)$/.exec(window.location.hash);
    if (match) {
      try { sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1])); } catch (e) { /* ignored */ }
      history.replaceState(null, '', window.location.pathname + window.location.search);
    }
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function showLogin(message) {
    $('board').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('token').focus();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    if (!token) { showLogin(''); return; }
    let response;
    try {
      response = await fetch('dashboard/data', {
        headers: { Authorization: 'Bearer ' + token },
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (e) {
      setStatus('error', 'cannot reach sluice; retrying');
      schedule();
      return;
    }
    if (response.status === 401 || response.status === 403) {
      let message = 'refused';
      try { message = (await response.json()).message || message; } catch (e) { /* not JSON */ }
      try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* ignored */ }
      token = null;
      setStatus('refused', 'refused (' + response.status + ')');
      showLogin('Refused: ' + message);
      return;
    }
    if (!response.ok) {
      setStatus('error', 'sluice answered ' + response.status + '; retrying');
      schedule();
      return;
    }
    const data = await response.json();
    $('login').hidden = true;
    $('board').hidden = false;
    render(data);
    setStatus('live', 'live, updated ' + new Date().toLocaleTimeString());
    schedule();
  }

  function card(title, rows, id) {
    const dl = el('dl');
    for (const [name, value, cls] of rows) {
      dl.append(el('dt', {}, [name]), el('dd', { class: cls || null }, [value === null || value === undefined ? '—' : String(value)]));
    }
    return el('div', { class: 'card', id: id }, [el('h2', {}, [title]), dl]);
  }

  function renderOverview(data) {
    const store = data.store;
    const reload = data.reload || {};
    const last = reload.last_reload;
    const top = data.top_keys;
    $('overview').replaceChildren(
      card('Store', [
        ['backend', store.backend],
        ['reachable', store.reachable ? 'yes' : 'NO', store.reachable ? 'ok' : 'bad'],
        ['on_error', store.shared ? store.on_error : store.on_error + ' (not used: in-process store)'],
        ['deciding by on_error', store.deciding_by_on_error ? 'YES' : 'no', store.deciding_by_on_error ? 'bad' : 'ok'],
        ['counters held', store.keys],
        ['evictions', store.evictions],
        ['degraded decisions', store.degraded_decisions],
        ['store errors', store.store_errors],
      ], 'store'),
      card('Config', [
        ['version', data.config_version],
        ['file', reload.config_path],
        ['loaded at', reload.loaded_at],
        ['last reload', last ? last.at + (last.ok ? ' (ok)' : ' (rejected)') : 'none', last && !last.ok ? 'bad' : null],
        ['last config error', last && last.error ? last.error : 'none', last && last.error ? 'bad' : null],
        ['restart required', (reload.restart_required || []).join(', ') || 'no'],
        ['uptime', data.uptime_seconds + ' s'],
      ], 'reload'),
      card('Top keys', [
        ['tracked', top.enabled ? 'yes' : 'no (stats.top_keys: false)'],
        ['counters per sketch', top.capacity],
        ['window', 'last ' + top.window],
        ['error', top.enabled ? 'each count at most total / ' + top.capacity + ' too high' : '—'],
      ], 'topkeys'),
    );
  }

  // Checks and denials per minute over the last hour, as two SVG paths.
  function chart(limit) {
    const width = 600, height = 130, left = 40, bottom = 18, top = 8;
    const decisions = new Array(MINUTES).fill(0);
    const denied = new Array(MINUTES).fill(0);
    for (const m of limit.minutes) {
      const i = MINUTES - 1 - m.minutes_ago;
      if (i >= 0 && i < MINUTES) { decisions[i] = m.decisions; denied[i] = m.denied; }
    }
    const max = Math.max(1, ...decisions);
    const x = (i) => left + (i * (width - left)) / (MINUTES - 1);
    const y = (v) => top + (height - top - bottom) * (1 - v / max);
    const path = (values) => values.map((v, i) => (i ? 'L' : 'M') + x(i).toFixed(1) + ' ' + y(v).toFixed(1)).join(' ');
    const sum = (values) => values.reduce((a, b) => a + b, 0);
    const name = limit.limit.name;
    return el('svg', {
      class: 'chart', viewBox: '0 0 ' + (width + 10) + ' ' + height, role: 'img',
      'aria-label': 'checks and denials per minute of ' + name + ' over the last hour',
      'data-limit': name,
    }, [
      el('line', { class: 'axis', x1: left, y1: height - bottom, x2: width, y2: height - bottom }, [], SVG),
      el('line', { class: 'axis', x1: left, y1: top, x2: left, y2: height - bottom }, [], SVG),
      el('text', { x: 2, y: top + 8 }, [String(max)], SVG),
      el('text', { x: 2, y: height - bottom }, ['0'], SVG),
      el('text', { x: left, y: height - 4 }, ['−60 min'], SVG),
      el('text', { x: width - 20, y: height - 4 }, ['now'], SVG),
      el('path', { class: 'series-decisions', d: path(decisions), 'data-points': MINUTES, 'data-total': sum(decisions), 'data-max': max }, [], SVG),
      el('path', { class: 'series-denied', d: path(denied), 'data-points': MINUTES, 'data-total': sum(denied) }, [], SVG),
    ], SVG);
  }

  function topTable(id, caption, unit, top) {
    const table = el('table', { id: id }, [el('caption', {}, [caption])]);
    if (!top) {
      table.append(el('tr', {}, [el('td', { class: 'empty' }, ['not tracked'])]));
      return table;
    }
    table.append(el('tr', {}, [el('th', {}, ['key']), el('th', { class: 'num' }, [unit]), el('th', { class: 'num' }, ['± error'])]));
    if (!top.keys.length) {
      table.append(el('tr', {}, [el('td', { class: 'empty', colspan: 3 }, ['none in the last minute'])]));
    }
    for (const entry of top.keys) {
      table.append(el('tr', { 'data-key': entry.key }, [
        el('td', { class: 'key' }, [entry.key]),
        el('td', { class: 'num' }, [String(entry.count)]),
        el('td', { class: 'num' }, [String(entry.error)]),
      ]));
    }
    return table;
  }

  function renderLimit(limit) {
    const info = limit.limit;
    const plans = (info.plans || []).map((p) => p.plan + ': ' + p.rates.join(', ')).join('; ');
    const totals = limit.totals || { allowed: 0, denied: 0, shadow_denied: 0 };
    const meta = info.algorithm + ', ' + info.rates.join(', ') + (plans ? ' — plans ' + plans : '') +
      (info.shadow ? ' — shadow (reports only)' : '') +
      ' — since start: ' + totals.allowed + ' allowed, ' + totals.denied + ' denied' +
      (totals.shadow_denied ? ', ' + totals.shadow_denied + ' would deny' : '');
    const id = encodeURIComponent(info.name);
    return el('article', { class: 'limit', id: 'limit-' + id }, [
      el('h2', {}, [info.name]),
      el('div', { class: 'meta' }, [meta]),
      el('div', { class: 'row' }, [
        el('div', {}, [
          chart(limit),
          el('div', { class: 'legend' }, [
            el('span', { class: 'decisions' }, ['— checks per minute']),
            el('span', { class: 'denied' }, ['— denied per minute']),
          ]),
        ]),
        topTable('top-spend-' + id, 'Top spenders (last minute)', 'spend', limit.top_spend),
        topTable('top-denied-' + id, 'Most denied (last minute)', 'denials', limit.top_denied),
      ]),
    ]);
  }

  function render(data) {
    renderOverview(data);
    $('limits').replaceChildren(...data.limits.map(renderLimit));
  }

  function start() {
    $('login').addEventListener('submit', (event) => {
      event.preventDefault();
      const value = $('token').value.trim();
      if (!value) return;
      token = value;
      $('token').value = '';
      try { sessionStorage.setItem(TOKEN_KEY, value); } catch (e) { /* ignored */ }
      setStatus('starting', 'checking token…');
      poll();
    });
    token = takeToken();
    if (token) { poll(); } else { setStatus('login', 'admin token needed'); showLogin(''); }
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
