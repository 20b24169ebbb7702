// shardgate console: reads /status every second, the shard map (/console/map) when the
// revision changes and the counters' history (/console/history) every period; draws the map on
// one canvas; sends operator actions to the admin write endpoints with the admin token.
'use strict';
(() => {
  // IDC colours by index in the topology; "no IDC can serve it" is near black.
  const PALETTE = ['#4e79a7', '#f28e2b', '#59a14f', '#b07aa1', '#76b7b2', '#edc948',
    '#ff9da7', '#9c755f', '#e15759', '#bab0ac'];
  const NONE = '#26282c';
  const MAP_PX = 640; // the map's side at zoom 1
  const MAX_CANVAS = 8192; // zoom stops before a canvas side passes this
  const TOKEN_KEY = 'shardgate.admin_token';
  const BY_KEY = 'shardgate.by';

  const state = {
    status: null, map: null, history: null, historyAt: 0, zoom: 1, highlight: null,
    token: sessionStorage.getItem(TOKEN_KEY) || '', updated: 0, moving: new Set(),
    fenced: new Set(), cards: new Map(), setRows: new Map(), pending: null,
  };
  const $ = id => document.getElementById(id);

  // A DOM element: el('td', {class: 'x', text: 'y', title: 't', data: {k: v}}, ...children).
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k === 'data') Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const colour = i => (i < 0 ? NONE : PALETTE[i % PALETTE.length]);
  const idcIndex = name => (state.map ? state.map.idcs.indexOf(name) : -1);
  const num = (v, digits = 1) => (v === null || v === undefined ? '–'
    : Number(v).toFixed(v >= 100 ? 0 : digits));
  function ago(unixSeconds) {
    if (!unixSeconds) return '';
    const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
    if (s < 90) return `${s}s ago`;
    if (s < 5400) return `${Math.round(s / 60)}m ago`;
    return `${Math.round(s / 3600)}h ago`;
  }

  // ---- talking to the admin listener -------------------------------------------------------

  function api(path, opts = {}) {
    const headers = Object.assign({}, opts.headers || {});
    if (state.token) headers.Authorization = 'Bearer ' + state.token;
    // Relative: the page works wherever the admin listener is mounted.
    return fetch(path, Object.assign({}, opts, { headers, cache: 'no-store' }));
  }

  function problem(text) {
    $('problem').textContent = text;
    $('problem').classList.toggle('hidden', !text);
  }

  async function readJson(path) {
    const r = await api(path);
    if (r.status === 401) {
      const e = new Error('401 unauthorized');
      e.unauthorized = true;
      throw e;
    }
    if (!r.ok) throw new Error(`${path} answered ${r.status}: ${await r.text()}`);
    return r.json();
  }

  async function tick() {
    try {
      const s = await readJson('status');
      state.status = s;
      if (!state.map || state.map.revision !== s.revision) {
        state.map = await readJson('console/map');
        indexMap();
      }
      if (Date.now() - state.historyAt >= 2000) {
        state.history = await readJson('console/history');
        state.historyAt = Date.now();
      }
      state.updated = Date.now();
      render();
      problem(s.source && !s.source.up
        ? `topology source ${s.source.kind} is down: serving the last good snapshot` +
          (s.source.last_problem ? ` (${s.source.last_problem})` : '') : '');
    } catch (e) {
      if (e.unauthorized) {
        problem('This gateway needs its admin token to show anything.');
        askToken(state.token ? 'The admin token was refused (401).' : 'The admin answered 401.');
      } else {
        problem('Cannot read the gateway: ' + e.message);
      }
    } finally {
      clearTimeout(state.timer);
      state.timer = setTimeout(tick, 1000);
    }
  }

  // ---- the shard map ------------------------------------------------------------------------

  function indexMap() {
    const m = state.map;
    state.fenced = new Set();
    for (const [a, b] of m.fenced) for (let s = a; s <= b; s++) state.fenced.add(s);
    state.moving = new Set();
    for (const mv of m.moves) for (const [a, b] of mv.shards) for (let s = a; s <= b; s++) state.moving.add(s);
    state.mapDirty = true;
  }

  function geometry() {
    const n = state.map.shard_count;
    let cols = 1;
    while (cols * cols < n) cols *= 2;
    const rows = Math.ceil(n / cols);
    const cell = Math.max(1, Math.floor(MAP_PX / cols)) * state.zoom;
    return { n, cols, rows, cell, gap: cell >= 4 ? 1 : 0 };
  }

  function maxZoom() {
    if (!state.map) return 1;
    const z = state.zoom;
    state.zoom = 1;
    const g = geometry();
    state.zoom = z;
    let m = 1;
    while (g.cols * g.cell * m * 2 <= MAX_CANVAS) m *= 2;
    return m;
  }

  let hatch = null;
  function hatchPattern(ctx) {
    if (hatch) return hatch;
    const c = document.createElement('canvas');
    c.width = c.height = 6;
    const x = c.getContext('2d');
    x.strokeStyle = 'rgba(0,0,0,0.6)';
    x.lineWidth = 1.5;
    x.beginPath();
    x.moveTo(-1, 7); x.lineTo(7, -1);
    x.moveTo(-1, 1); x.lineTo(1, -1);
    x.moveTo(5, 7); x.lineTo(7, 5);
    x.stroke();
    hatch = ctx.createPattern(c, 'repeat');
    return hatch;
  }

  function drawMap() {
    const m = state.map;
    if (!m) return;
    const canvas = $('map');
    const g = geometry();
    const width = g.cols * g.cell, height = g.rows * g.cell;
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = '#0b0d10';
    ctx.fillRect(0, 0, width, height);
    const side = g.cell - g.gap;
    const at = s => [(s % g.cols) * g.cell, Math.floor(s / g.cols) * g.cell];
    // One path per serving IDC: 16,384 rectangles in a handful of fills.
    const byIdc = new Map();
    for (let s = 0; s < g.n; s++) {
      const i = m.serving[s];
      if (!byIdc.has(i)) byIdc.set(i, []);
      byIdc.get(i).push(s);
    }
    for (const [i, shards] of byIdc) {
      ctx.fillStyle = colour(i);
      ctx.beginPath();
      for (const s of shards) { const [x, y] = at(s); ctx.rect(x, y, side, side); }
      ctx.fill();
    }
    // Served away from home: a corner in the home IDC's colour (where big enough to see).
    if (g.cell >= 8) {
      const t = Math.floor(side / 3);
      for (let s = 0; s < g.n; s++) {
        if (m.home[s] === m.serving[s]) continue;
        const [x, y] = at(s);
        ctx.fillStyle = colour(m.home[s]);
        ctx.beginPath();
        ctx.moveTo(x, y); ctx.lineTo(x + t, y); ctx.lineTo(x, y + t);
        ctx.fill();
      }
    }
    if (state.fenced.size) {
      ctx.fillStyle = hatchPattern(ctx);
      ctx.beginPath();
      for (const s of state.fenced) { const [x, y] = at(s); ctx.rect(x, y, side, side); }
      ctx.fill();
    }
    if (state.moving.size) {
      // Outline each moving range: the edges between a moving shard and one that is not.
      ctx.strokeStyle = '#ffffff';
      ctx.lineWidth = g.cell >= 8 ? 2 : 1;
      ctx.beginPath();
      const moving = s => s >= 0 && s < g.n && state.moving.has(s);
      for (const s of state.moving) {
        const [x, y] = at(s);
        const c = s % g.cols;
        if (c === 0 || !moving(s - 1)) { ctx.moveTo(x + 0.5, y); ctx.lineTo(x + 0.5, y + g.cell); }
        if (c === g.cols - 1 || !moving(s + 1)) { ctx.moveTo(x + g.cell - 0.5, y); ctx.lineTo(x + g.cell - 0.5, y + g.cell); }
        if (!moving(s - g.cols)) { ctx.moveTo(x, y + 0.5); ctx.lineTo(x + g.cell, y + 0.5); }
        if (!moving(s + g.cols)) { ctx.moveTo(x, y + g.cell - 0.5); ctx.lineTo(x + g.cell, y + g.cell - 0.5); }
      }
      ctx.stroke();
    }
    if (state.highlight !== null && state.highlight < g.n) {
      const [x, y] = at(state.highlight);
      const r = Math.max(6, g.cell);
      ctx.lineWidth = 3;
      ctx.strokeStyle = '#000';
      ctx.strokeRect(x + side / 2 - r, y + side / 2 - r, 2 * r, 2 * r);
      ctx.lineWidth = 2;
      ctx.strokeStyle = '#ffe14d';
      ctx.strokeRect(x + side / 2 - r, y + side / 2 - r, 2 * r, 2 * r);
    }
    $('zoom-level').textContent = state.zoom + '×';
    $('map-caption').textContent = `${g.n} shards · revision ${m.revision}`;
    state.mapDirty = false;
  }

  function drawLegend() {
    const m = state.map;
    const s = state.status;
    const legend = $('legend');
    legend.replaceChildren();
    m.idcs.forEach((name, i) => {
      const served = m.serving.filter(x => x === i).length;
      const idc = s.idcs.find(d => d.name === name);
      legend.append(el('span', { title: `${name}: ${served} shards served` },
        el('i', { class: 'swatch', 'data-colour': colour(i) }),
        `${name} ${served}` + (idc && idc.state !== 'active' ? ` (${idc.state})` : '')));
    });
    const unserved = m.serving.filter(x => x < 0).length;
    if (unserved) legend.append(el('span', {}, el('i', { class: 'swatch', 'data-colour': NONE }), `no IDC ${unserved}`));
    legend.append(el('span', { class: 'dim' }, el('i', { class: 'swatch hatched' }), `fenced ${state.fenced.size}`));
    legend.append(el('span', { class: 'dim' }, el('i', { class: 'swatch outlined' }), `moving ${state.moving.size}`));
    legend.append(el('span', { class: 'dim', text: 'corner: home IDC when served elsewhere' }));
    // Colours through the CSSOM: a style attribute would break the page's CSP.
    for (const sw of legend.querySelectorAll('[data-colour]')) sw.style.background = sw.dataset.colour;
  }

  function shardAt(ev) {
    if (!state.map) return null;
    const g = geometry();
    const c = Math.floor(ev.offsetX / g.cell), r = Math.floor(ev.offsetY / g.cell);
    if (c < 0 || c >= g.cols || r < 0) return null;
    const s = r * g.cols + c;
    return s < g.n ? s : null;
  }

  function showTip(ev) {
    const s = shardAt(ev);
    const tip = $('tip');
    if (s === null) { tip.classList.add('hidden'); return; }
    const m = state.map;
    const name = i => (i < 0 ? 'none' : m.idcs[i]);
    const lines = [`shard ${s}`, `serving ${name(m.serving[s])}`, `home    ${name(m.home[s])}`];
    if (state.fenced.has(s)) lines.push('fenced: writes refused (503 fenced)');
    const mv = m.moves.find(x => x.shards.some(([a, b]) => s >= a && s <= b));
    if (mv) lines.push(`moving: ${mv.kind} ${mv.from || ''} → ${mv.to || 'failover order'} (${mv.phase})`);
    tip.textContent = lines.join('\n');
    tip.style.left = ev.clientX + 14 + 'px';
    tip.style.top = ev.clientY + 14 + 'px';
    tip.classList.remove('hidden');
  }

  function setZoom(z, anchor) {
    z = Math.max(1, Math.min(maxZoom(), z));
    if (z === state.zoom || !state.map) return;
    const wrap = $('map-wrap');
    const f = z / state.zoom;
    const ax = anchor ? anchor.x : wrap.clientWidth / 2, ay = anchor ? anchor.y : wrap.clientHeight / 2;
    const left = (wrap.scrollLeft + ax) * f - ax, top = (wrap.scrollTop + ay) * f - ay;
    state.zoom = z;
    drawMap();
    wrap.scrollLeft = left;
    wrap.scrollTop = top;
  }

  function scrollToShard(s) {
    const g = geometry();
    const wrap = $('map-wrap');
    wrap.scrollLeft = (s % g.cols) * g.cell - wrap.clientWidth / 2;
    wrap.scrollTop = Math.floor(s / g.cols) * g.cell - wrap.clientHeight / 2;
  }

  async function explain(ev) {
    ev.preventDefault();
    const key = $('key-input').value;
    const route = $('route-input').value.trim();
    const box = $('explain');
    box.classList.remove('hidden');
    if (!key) { box.textContent = 'Type a sharding key.'; return; }
    const q = new URLSearchParams({ key });
    if (route) q.set('route', route);
    try {
      const r = await api('explain?' + q);
      const text = await r.text();
      if (!r.ok) { box.textContent = `explain → ${r.status} ${text}`; state.highlight = null; drawMap(); return; }
      const v = JSON.parse(text);
      box.textContent = v.shard === null
        ? `${v.key} → route ${v.route} is not sharded → ${v.serving_idc || 'no IDC'} (${v.reason})`
        : `${v.key} → shard ${v.shard} · home ${v.home_idc} · serving ${v.serving_idc || 'none'}` +
          `${v.fenced ? ' · FENCED' : ''} · ${v.reason} · failover order ${(v.failover_order || []).join(' → ')}`;
      state.highlight = v.shard;
      drawMap();
      if (v.shard !== null) scrollToShard(v.shard);
    } catch (e) {
      box.textContent = 'explain failed: ' + e.message;
    }
  }

  // ---- sparklines ---------------------------------------------------------------------------

  function spark(canvas, values, { colour: c = '#8fb8ff', floor = null } = {}) {
    const w = canvas.width, h = canvas.height;
    const ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = '#0e1115';
    ctx.fillRect(0, 0, w, h);
    const vals = (values || []).slice(-120);
    const finite = vals.filter(v => v !== null && v !== undefined);
    if (!finite.length) return;
    const max = Math.max(...finite, floor === null ? 0 : floor) || 1;
    const x = i => (vals.length === 1 ? w - 2 : 1 + (i * (w - 3)) / (vals.length - 1));
    const y = v => h - 2 - (v / max) * (h - 4);
    if (floor !== null) {
      ctx.strokeStyle = '#3a4250';
      ctx.setLineDash([2, 2]);
      ctx.beginPath(); ctx.moveTo(0, y(floor)); ctx.lineTo(w, y(floor)); ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.strokeStyle = c;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    vals.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      if (pen) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
      pen = true;
    });
    ctx.stroke();
  }

  const last = a => (a && a.length ? a[a.length - 1] : null);

  function sparkBox(label, w = 120, h = 26) {
    const canvas = el('canvas', { width: w, height: h });
    const value = el('span', { class: 'value' });
    return { node: el('div', { class: 'spark' }, el('span', { class: 'label', text: label }), canvas, value), canvas, value };
  }

  // ---- IDCs ---------------------------------------------------------------------------------

  function idcCard(name) {
    if (state.cards.has(name)) return state.cards.get(name);
    const swatch = el('i', { class: 'swatch' });
    const badge = el('span', { class: 'badge' });
    const health = el('span', { class: 'badge' });
    const shards = el('div', { class: 'who' });
    const who = el('div', { class: 'who' });
    const backends = el('div', { class: 'backends' });
    const rps = sparkBox('requests/s'), err = sparkBox('errors (5xx)'), p99 = sparkBox('p99 ms');
    const actions = el('div', { class: 'actions' });
    for (const [action, title] of [['drain', 'planned: shards leave behind a write fence'],
      ['failover', 'emergency: shards leave at once'],
      ['restore', 'failback: home shards return in warm-up steps']]) {
      actions.append(el('button', { type: 'button', title, text: action, data: { action, idc: name } }));
    }
    const node = el('div', { class: 'idc', data: { idc: name } },
      el('div', {}, el('div', { class: 'name' }, swatch, name), badge, ' ', health, shards),
      el('div', {}, who, backends, el('div', { class: 'sparks' }, rps.node, err.node, p99.node)),
      actions);
    const card = { node, swatch, badge, health, shards, who, backends, rps, err, p99, actions };
    state.cards.set(name, card);
    $('idcs').append(node);
    return card;
  }

  function renderIdcs() {
    const s = state.status;
    const fileMode = s.source.kind === 'file';
    const names = new Set(s.idcs.map(i => i.name));
    for (const [name, card] of state.cards) if (!names.has(name)) { card.node.remove(); state.cards.delete(name); }
    for (const idc of s.idcs) {
      const card = idcCard(idc.name);
      $('idcs').append(card.node); // keeps the topology's order
      card.swatch.style.background = colour(idcIndex(idc.name));
      card.badge.className = 'badge ' + idc.state;
      card.badge.textContent = idc.state;
      card.health.className = 'badge ' + (idc.healthy ? 'healthy' : 'unhealthy');
      card.health.textContent = idc.healthy ? 'healthy' : 'unhealthy';
      card.shards.textContent = `home ${idc.shards_home} · serving ${idc.shards_served} shards`;
      const o = (s.overrides.find(x => x.target === 'idc/' + idc.name) || {}).value;
      card.who.textContent = o
        ? `${o.state}${o.reason ? ': ' + o.reason : ''} · by ${o.by || '?'} · ${ago(o.at)}`
        : (idc.reason ? `reason: ${idc.reason}` : 'no override: as the topology says');
      card.backends.replaceChildren(...Object.entries(idc.backends || {}).map(([set, list]) =>
        el('span', {}, set + ' ', ...list.map(b => {
          const cls = b.ejected ? 'ejected' : b.healthy ? 'up' : 'down';
          return el('span', { title: `${b.addr}: ${b.ejected ? 'ejected' : b.healthy ? 'healthy' : 'failing probes'}, ${b.inflight} in flight` },
            el('i', { class: 'dot ' + cls }));
        }))));
      const h = state.history && state.history.idcs ? state.history.idcs[idc.name] : null;
      const c = colour(idcIndex(idc.name));
      spark(card.rps.canvas, h && h.rps, { colour: c });
      card.rps.value.textContent = num(last(h && h.rps));
      const errs = h ? h.errors_ps : null;
      spark(card.err.canvas, errs, { colour: '#e5484d' });
      const e = last(errs), r = last(h && h.rps);
      card.err.value.textContent = e === null ? '–' : `${num(e)}/s` + (r ? ` (${num((100 * e) / r)}%)` : '');
      spark(card.p99.canvas, h && h.p99_ms, { colour: '#edc948' });
      card.p99.value.textContent = num(last(h && h.p99_ms), 2);
      card.actions.classList.toggle('hidden', !fileMode);
    }
    $('actions-note').classList.toggle('hidden', fileMode);
    $('actions-note').textContent = fileMode ? '' : 'etcd mode: operator actions go through the CLI ' +
      '(shardgate drain|failover|restore|degrade --etcd URL --cluster NAME); this page only shows.';
  }

  // ---- sets, breakers -----------------------------------------------------------------------

  function renderSets() {
    const s = state.status;
    const fileMode = s.source.kind === 'file';
    const tbody = document.querySelector('#sets tbody');
    const hist = state.history || {};
    for (const [name, v] of Object.entries(s.sets)) {
      let row = state.setRows.get(name);
      if (!row) {
        const meter = el('div', { class: 'meter' }, el('div'));
        const text = el('span');
        const sp = el('canvas', { width: 110, height: 22 });
        const refused = el('div', { class: 'refusals' });
        const degraded = el('span');
        const on = el('button', { type: 'button', text: 'on', data: { action: 'degrade-on', set: name } });
        const off = el('button', { type: 'button', text: 'off', data: { action: 'degrade-off', set: name } });
        const buttons = el('span', { class: 'actions' }, on, off);
        const tr = el('tr', { data: { set: name } }, el('td', {}, el('b', { text: name }), el('div', { class: 'who', text: `priority ${v.priority}` })),
          el('td', {}, meter, text), el('td', {}, sp), el('td', {}, refused), el('td', {}, degraded, ' ', buttons));
        row = { tr, meter, text, sp, refused, degraded, buttons };
        state.setRows.set(name, row);
        tbody.append(tr);
      }
      const frac = v.max_inflight ? v.inflight / v.max_inflight : 0;
      row.meter.className = 'meter' + (frac >= 1 ? ' full' : frac >= 0.8 ? ' hot' : '');
      row.meter.firstChild.style.width = Math.min(100, 100 * frac) + '%';
      row.text.textContent = `${v.inflight} / ${v.max_inflight}`;
      spark(row.sp, hist.inflight ? hist.inflight[name] : null);
      const reasons = (hist.refused || {})[name] || {};
      row.refused.replaceChildren(...(Object.keys(reasons).length
        ? Object.entries(reasons).map(([reason, r]) => el('span', { title: `shardgate_refused_total{set="${name}",reason="${reason}"}` },
          `${reason} ${r.total} · ${num(last(r.rate))}/s`))
        : [el('span', { class: 'dim', text: 'none' })]));
      const routes = v.degraded_routes && v.degraded_routes.length ? ` routes: ${v.degraded_routes.join(', ')}` : '';
      row.degraded.className = v.degraded ? 'on' : 'dim';
      row.degraded.textContent = (v.degraded ? 'ON' : 'off') + routes + (v.degradable ? '' : ' (not degradable)');
      row.buttons.classList.toggle('hidden', !fileMode);
    }
    // Breakers by (IDC, set): only those that have seen a request exist.
    const sets = Object.keys(s.sets);
    const thead = document.querySelector('#breakers thead');
    thead.replaceChildren(el('tr', {}, el('th', { text: 'IDC' }), ...sets.map(x => el('th', { text: x }))));
    const tb = document.querySelector('#breakers tbody');
    tb.replaceChildren(...s.idcs.map(idc => el('tr', {}, el('td', { text: idc.name }), ...sets.map(set => {
      const b = (s.breakers || []).find(x => x.idc === idc.name && x.set === set);
      const st = b ? b.state : 'none';
      return el('td', { class: 'breaker ' + st, text: b ? st.replace('_', '-') : '–' });
    }))));
  }

  // ---- moves, warm-up, gateways -------------------------------------------------------------

  function renderMoves() {
    const s = state.status;
    const m = state.map;
    const box = $('moves');
    const open = s.moves.filter(x => x.phase === 'fencing');
    const done = s.moves.filter(x => x.phase !== 'fencing').slice(-5).reverse();
    const gateways = (s.gateways || []).filter(g => !g.error);
    const rows = open.map(mv => {
      const fenceMs = m ? m.fence_ms : 2000;
      const frac = Math.min(1, (mv.fencing_ms || 0) / Math.max(1, fenceMs));
      const acked = gateways.filter(g => g.applied_revision >= mv.fence_revision).length;
      const bar = el('div', { class: 'progress' }, el('div'));
      bar.firstChild.style.width = 100 * frac + '%';
      return el('div', { class: 'move', data: { move: mv.id } },
        el('b', { text: `${mv.kind}${mv.step ? ' step ' + mv.step : ''} ${mv.from || ''} → ${mv.to || 'failover order'}` }),
        ` fencing ${mv.ranges.length} range${mv.ranges.length === 1 ? '' : 's'} (${mv.ranges.slice(0, 4).join(', ')}${mv.ranges.length > 4 ? ', …' : ''})`,
        el('div', { class: 'who', text: `fence held ${num((mv.fencing_ms || 0) / 1000)}s of ${num(fenceMs / 1000)}s` +
          (gateways.length ? ` · acknowledged by ${acked}/${gateways.length} gateways` : '') +
          ` · by ${mv.by || '?'}${mv.reason ? ': ' + mv.reason : ''}` }), bar);
    });
    if (!rows.length) rows.push(el('div', { class: 'dim', text: 'No move in flight.' }));
    for (const mv of done) {
      rows.push(el('div', { class: 'move dim', data: { move: mv.id } },
        `${mv.kind}${mv.step ? ' step ' + mv.step : ''} ${mv.from || ''} → ${mv.to || 'failover order'}: ${mv.phase.replace('_', ' ')} ${ago(mv.finished_at)}` +
        (mv.note ? ` (${mv.note})` : '')));
    }
    box.replaceChildren(...rows);

    // Warm-up: the steps come home one fenced move at a time; the curve is shards served.
    const warm = $('warmups');
    const warming = s.idcs.filter(i => i.state === 'warming');
    warm.replaceChildren(...warming.map(idc => {
      const o = (s.overrides.find(x => x.target === 'idc/' + idc.name) || {}).value || {};
      const steps = o.warmup_s === 0 ? 1 : 10;
      const done = o.warmup_step || 0;
      const sp = sparkBox(`${idc.name} shards served (home ${idc.shards_home})`, 260, 48);
      const h = state.history && state.history.idcs ? state.history.idcs[idc.name] : null;
      spark(sp.canvas, h && h.shards_served, { colour: colour(idcIndex(idc.name)), floor: idc.shards_home });
      sp.value.textContent = `${idc.shards_served} / ${idc.shards_home}`;
      const bar = el('div', { class: 'progress' }, el('div'));
      bar.firstChild.style.width = (100 * done) / steps + '%';
      return el('div', { class: 'move' }, el('b', { text: `${idc.name} warming` }),
        ` step ${done} of ${steps}` + (o.warmup_s !== undefined ? ` over ${o.warmup_s}s` : ''), bar, sp.node);
    }));
  }

  function renderCluster() {
    const s = state.status;
    const etcd = s.source.kind === 'etcd';
    $('cluster-panel').classList.toggle('hidden', !etcd);
    if (!etcd) return;
    $('leader').textContent = s.leader ? `leader ${s.leader}` : 'no leader';
    const tbody = document.querySelector('#gateways tbody');
    tbody.replaceChildren(...(s.gateways || []).map(g => {
      if (g.error) return el('tr', { class: 'laggard' }, el('td', { text: g.instance }), el('td', { colspan: 5, text: 'unreadable: ' + g.error }));
      const lag = s.revision - g.applied_revision;
      const view = Object.entries(g.view || {}).map(([i, ok]) => `${i} ${ok ? '✓' : '✗'}`).join(' ');
      return el('tr', { class: lag > 0 ? 'laggard' : '', data: { instance: g.instance } },
        el('td', { text: (g.instance === s.leader ? '★ ' : '') + g.instance }), el('td', { text: g.idc || '' }),
        el('td', { text: g.addr || '' }), el('td', { text: g.applied_revision }),
        el('td', { text: lag > 0 ? `${lag} behind` : 'current' }), el('td', { text: view }));
    }));
  }

  function render() {
    const s = state.status;
    $('cluster').textContent = s.cluster;
    $('revision').textContent = s.revision;
    $('source').textContent = `${s.source.kind} ${s.source.up ? 'up' : 'DOWN'}`;
    $('local-idc').textContent = s.local_idc || '–';
    $('inflight-total').textContent = s.inflight_total;
    $('updated').textContent = 'live · ' + new Date(state.updated).toLocaleTimeString();
    if (state.map) { drawMap(); drawLegend(); }
    renderIdcs();
    renderSets();
    renderMoves();
    renderCluster();
  }

  // ---- token, confirmation, actions ---------------------------------------------------------

  function askToken(why) {
    $('token-why').textContent = why || '';
    $('token-dialog').classList.remove('hidden');
    $('token-input').focus();
  }

  const ACTIONS = {
    drain: idc => ({ title: `Drain ${idc}?`, what: `Planned: the shards ${idc} serves leave for the next IDC in their failover order, behind a write fence (writes to them get 503 fenced until the fence is lifted).`, path: `override/idc/${encodeURIComponent(idc)}`, body: { state: 'draining' } }),
    failover: idc => ({ title: `Fail over ${idc}?`, what: `Emergency: ${idc} is marked down and its shards are served elsewhere at once (reads at once, writes after the fence).`, path: `override/idc/${encodeURIComponent(idc)}`, body: { state: 'down' } }),
    restore: idc => ({ title: `Restore ${idc}?`, what: `Failback: ${idc} becomes warming and its home shards come back in steps.`, path: `override/idc/${encodeURIComponent(idc)}`, body: { state: 'warming' }, warmup: true }),
    'degrade-on': set => ({ title: `Degrade ${set}?`, what: `Every route of set ${set} answers its fallback at once, without calling a backend.`, path: `override/degrade/${encodeURIComponent(set)}`, body: { on: true }, force: true }),
    'degrade-off': set => ({ title: `Stop degrading ${set}?`, what: `Routes of set ${set} call their backends again.`, path: `override/degrade/${encodeURIComponent(set)}`, body: { on: false } }),
  };

  function requestBody() {
    const a = state.pending;
    const body = Object.assign({}, a.body, { reason: $('confirm-reason').value, by: $('confirm-by').value });
    const w = $('confirm-warmup').value.trim();
    if (a.warmup && w !== '') body.warmup_s = Number(w);
    if (a.force && $('confirm-force').checked) body.force = true;
    return body;
  }

  function showRequest() {
    $('confirm-request').textContent = `POST /${state.pending.path}\n${JSON.stringify(requestBody())}`;
  }

  function confirmAction(action, target) {
    const a = ACTIONS[action](target);
    state.pending = a;
    $('confirm-title').textContent = a.title;
    $('confirm-what').textContent = a.what;
    $('confirm-reason').value = '';
    $('confirm-by').value = sessionStorage.getItem(BY_KEY) || 'console';
    $('confirm-warmup').value = '';
    $('confirm-force').checked = false;
    $('confirm-warmup-row').classList.toggle('hidden', !a.warmup);
    $('confirm-force-row').classList.toggle('hidden', !a.force);
    showRequest();
    $('confirm-dialog').classList.remove('hidden');
    $('confirm-reason').focus();
  }

  async function perform(ev) {
    ev.preventDefault();
    const a = state.pending;
    if (!a) return;
    const body = requestBody();
    sessionStorage.setItem(BY_KEY, body.by);
    state.pending = null;
    $('confirm-dialog').classList.add('hidden');
    const line = `POST /${a.path} ${JSON.stringify(body)}`;
    const out = $('action-result');
    out.className = 'result dim';
    out.textContent = line + '\n→ waiting for the gateway…';
    let status, text;
    try {
      const r = await api(a.path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      status = `${r.status} ${r.statusText}`.trim();
      text = await r.text();
      out.className = 'result ' + (r.ok ? 'ok' : 'refused');
      out.dataset.status = r.status;
      if (r.status === 401) askToken('The action was refused: 401 (token missing or wrong).');
    } catch (e) {
      status = 'no answer';
      text = e.message;
      out.className = 'result refused';
      out.dataset.status = '0';
    }
    // The endpoint's answer, verbatim: the same refusals the CLI prints.
    out.textContent = `${line}\n→ ${status}\n${text}`;
    $('action-log').prepend(el('li', { text: `${new Date().toLocaleTimeString()} ${a.title.replace('?', '')} → ${status}` }));
    tick();
  }

  function start() {
    $('token-open').addEventListener('click', () => askToken(''));
    $('token-form').addEventListener('submit', ev => {
      ev.preventDefault();
      state.token = $('token-input').value.trim();
      if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token); else sessionStorage.removeItem(TOKEN_KEY);
      $('token-input').value = '';
      $('token-dialog').classList.add('hidden');
      tick();
    });
    $('token-clear').addEventListener('click', () => {
      state.token = '';
      sessionStorage.removeItem(TOKEN_KEY);
      $('token-input').value = '';
    });
    $('token-cancel').addEventListener('click', () => $('token-dialog').classList.add('hidden'));
    document.body.addEventListener('click', ev => {
      const b = ev.target.closest('button[data-action]');
      if (b) confirmAction(b.dataset.action, b.dataset.idc || b.dataset.set);
    });
    $('confirm-form').addEventListener('submit', perform);
    $('confirm-form').addEventListener('input', showRequest);
    $('confirm-no').addEventListener('click', () => { state.pending = null; $('confirm-dialog').classList.add('hidden'); });
    document.addEventListener('keydown', ev => {
      if (ev.key !== 'Escape') return;
      state.pending = null;
      $('confirm-dialog').classList.add('hidden');
      $('token-dialog').classList.add('hidden');
    });
    $('key-form').addEventListener('submit', explain);
    $('zoom-in').addEventListener('click', () => setZoom(state.zoom * 2));
    $('zoom-out').addEventListener('click', () => setZoom(state.zoom / 2));
    const canvas = $('map'), wrap = $('map-wrap');
    canvas.addEventListener('mousemove', showTip);
    canvas.addEventListener('mouseleave', () => $('tip').classList.add('hidden'));
    wrap.addEventListener('wheel', ev => {
      ev.preventDefault();
      const r = wrap.getBoundingClientRect();
      setZoom(ev.deltaY < 0 ? state.zoom * 2 : state.zoom / 2, { x: ev.clientX - r.left, y: ev.clientY - r.top });
    }, { passive: false });
    // Drag to pan when zoomed in.
    let drag = null;
    wrap.addEventListener('mousedown', ev => { drag = { x: ev.clientX, y: ev.clientY, l: wrap.scrollLeft, t: wrap.scrollTop }; });
    window.addEventListener('mouseup', () => { drag = null; });
    window.addEventListener('mousemove', ev => {
      if (!drag) return;
      wrap.scrollLeft = drag.l - (ev.clientX - drag.x);
      wrap.scrollTop = drag.t - (ev.clientY - drag.y);
    });
    tick();
  }

  // For operators' scripts and the browser tests: the model behind the page, and the colour
  // actually drawn for a shard.
  window.shardgate = {
    state,
    colourOf: name => colour(idcIndex(name)),
    cellCentre(s) {
      const g = geometry();
      const side = g.cell - g.gap;
      return { x: (s % g.cols) * g.cell + Math.floor(side / 2), y: Math.floor(s / g.cols) * g.cell + Math.floor(side / 2) };
    },
    pixel(s) {
      const { x, y } = this.cellCentre(s);
      const d = $('map').getContext('2d').getImageData(x, y, 1, 1).data;
      return '#' + [d[0], d[1], d[2]].map(v => v.toString(16).padStart(2, '0')).join('');
    },
  };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
