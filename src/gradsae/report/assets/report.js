(function () {
'use strict';
const DATA = JSON.parse(document.getElementById('gradsae-data').textContent);
const NAMES = {gradsae: 'GradSAE', activation: 'activation', random: 'random', ig: 'integrated gradients', relp: 'RelP',
  ablation: 'exact ablation', activation_answer: 'activation at the answer', activation_nosink: 'activation, sink excluded'};
const WHAT = {gradsae: 'influence on the answer', activation: 'mean activation', random: 'seeded random order',
  ig: 'integrated gradients of Y', relp: 'RelP propagation of dY', ablation: 'exact effect of zeroing it on Y',
  activation_answer: 'activation at the answer position', activation_nosink: 'mean activation without the sink token'};
const nameOf = (m) => NAMES[m] || m;
const state = {layer: 0, example: 0, latent: null, ranking: 'gradsae', colour: 'influence', sort: 'influence', desc: true, filter: 'all', query: ''};
const $ = (sel, root) => (root || document).querySelector(sel);
const el = (tag, attrs, ...kids) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') node.className = v; else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
  return node;
};
const fmt = (x) => x === null || x === undefined ? '-' : (Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 0.001) ? x.toExponential(2) : x.toPrecision(3));
const layer = () => DATA.layers[state.layer];
// the ranking methods of this layer's examples (older files: GradSAE and activation), and the chosen one
const methods = () => (layer() && layer().methods && layer().methods.length ? layer().methods : ['gradsae', 'activation']);
const ranking = () => (methods().includes(state.ranking) ? state.ranking : methods()[0]);

function colour(value, scale, kind) {
  if (!value || !scale) return '';
  const a = Math.min(1, Math.abs(value) / scale) * 0.85;
  if (kind === 'activation') return `rgba(217,119,6,${a.toFixed(3)})`;
  return value > 0 ? `rgba(192,57,43,${a.toFixed(3)})` : `rgba(37,99,235,${a.toFixed(3)})`;
}
function shown(token) {
  // a token of spaces only would be an empty box: show each space as an open box
  if (/^ +$/.test(token)) return '\u2423'.repeat(token.length);
  return token.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5');
}
function isSpecial(token) { return /^<\|?[^>]*\|?>$/.test(token.trim()) && token.trim().length > 2; }

function tokenSpans(tokens, values, kind, opts) {
  const o = opts || {};
  const scale = Math.max(0, ...values.map(Math.abs));
  const box = el('div', {class: o.cls || 'tokens'});
  tokens.forEach((t, i) => {
    const span = el('span', {class: 'tok', text: shown(t)});
    if (isSpecial(t)) span.classList.add('special');
    if (o.genFrom !== undefined && i >= o.genFrom) span.classList.add('gen');
    if (o.peak === i) span.classList.add('peak');
    const bg = colour(values[i], scale, kind);
    if (bg) span.style.background = bg;
    if (o.titles) span.title = o.titles[i];
    box.append(span);
    for (let n = 0; n < (t.match(/\n/g) || []).length; n++) box.append(el('br', {}));
  });
  return box;
}

// -- examples view -------------------------------------------------------------------------
function traceOf(ex, latent) { return ex.traces.find((t) => t.latent === latent); }
function topSet(ex, method) { return new Set((ex.top[method] || []).map((p) => p[0])); }

function renderExamples() {
  const view = $('#view-examples');
  view.replaceChildren();
  if (!DATA.layers.length) { view.append(el('p', {class: 'muted', text: 'No per-example data in this report.'})); return; }
  view.append(layerPicker(), rankingPicker('ranking-select'));
  const L = layer();
  const list = el('div', {class: 'ex-list', id: 'example-list'});
  L.examples.forEach((ex, i) => {
    list.append(el('div', {class: 'ex-item' + (i === state.example ? ' active' : ''), 'data-index': i,
      onclick: () => { state.example = i; state.latent = null; renderExamples(); }},
      el('b', {text: `#${ex.id}`}), el('span', {class: 'small muted', text: `answer: ${ex.answer}`}),
      el('span', {class: 'small flips', text: flips(ex)})));
  });
  view.append(el('div', {class: 'ex-layout'}, list, exampleDetail(L.examples[state.example])));
}

function layerPicker() {
  if (DATA.layers.length < 2) return el('div', {class: 'muted small', text: `Layer ${layer().layer}`});
  const select = el('select', {id: 'layer-select', onchange: (e) => { state.layer = +e.target.value; state.example = 0; state.latent = null; render(); }});
  DATA.layers.forEach((L, i) => { const opt = el('option', {value: i, text: `layer ${L.layer}`}); if (i === state.layer) opt.selected = true; select.append(opt); });
  return el('div', {class: 'controls'}, 'Layer ', select);
}

function rankingPicker(id) {
  const select = el('select', {id: id, title: 'the ranking the TopK list, the token colours and the latent table use',
    onchange: (e) => { state.ranking = e.target.value; state.latent = null; state.filter = 'all';
      state.sort = {gradsae: 'influence', activation: 'activation_mean'}[state.ranking] || 'score_rank'; state.desc = true; render(); }});
  for (const m of methods()) { const opt = el('option', {value: m, text: nameOf(m)}); if (m === ranking()) opt.selected = true; select.append(opt); }
  return el('div', {class: 'controls'}, 'Ranking ', select, el('span', {class: 'small muted', text: WHAT[ranking()] || ''}));
}

function firstLatent(ex) {
  for (const m of [ranking(), 'gradsae', 'activation']) { const t = ex.top[m]; if (t && t.length) return t[0][0]; }
  return null;
}

function tokenSource(trace) {
  // whose signed per-token values colour the tokens: the ranking's own (gradsae, ig, relp), else GradSAE's influence
  const m = ranking();
  return trace && trace.token_scores && trace.token_scores[m] ? m : 'gradsae';
}

function flips(ex) {
  // the smallest K at which masking each ranking's TopK changed the answer
  const base = ex.masked.none !== undefined ? ex.masked.none : ex.answer;
  const first = {};
  for (const [key, text] of Object.entries(ex.masked)) {
    const [method, set, k] = key.split('/');
    if (set !== 'top' || text === base || !NAMES[method]) continue;
    if (!(method in first) || parseFloat(k) < parseFloat(first[method])) first[method] = k;
  }
  const parts = Object.entries(first).map(([m, k]) => `${NAMES[m]} K=${k}`);
  return parts.length ? `changed by masking ${parts.join(', ')}` : '';
}

function exampleDetail(ex) {
  if (!ex) return el('p', {class: 'muted', text: 'No kept examples at this layer.'});
  if (state.latent === null) state.latent = firstLatent(ex);
  const box = el('div', {id: 'example-detail'});
  box.append(el('h2', {text: `Example #${ex.id}`}));
  box.append(el('div', {class: 'small'}, el('b', {text: 'Gold: '}), ex.gold.join(' | ') || '-', '   ',
    el('b', {text: 'Objective: '}), `p(${JSON.stringify(ex.target)}) = ${fmt(ex.objective)}`));
  box.append(chips(ex));
  const trace = traceOf(ex, state.latent);
  const src = tokenSource(trace);
  box.append(colourControls(src));
  const perToken = (j) => (src === 'gradsae' ? trace.influence[j] : trace.token_scores[src][j]);
  const values = ex.tokens.map(() => 0);
  const titles = ex.tokens.map((t, i) => `position ${i}: not active`);
  if (trace) trace.positions.forEach((p, j) => {
    values[p] = state.colour === 'activation' ? trace.activation[j] : perToken(j);
    titles[p] = `position ${p}: activation ${fmt(trace.activation[j])}, influence ${fmt(trace.influence[j])}`
      + (src === 'gradsae' ? '' : `, ${nameOf(src)} ${fmt(perToken(j))}`);
  });
  const tokens = tokenSpans(ex.tokens, values, state.colour, {genFrom: ex.prompt_len, titles: titles});
  tokens.id = 'prompt-tokens';
  tokens.dataset.colour = state.colour;
  tokens.dataset.latent = state.latent;
  tokens.dataset.ranking = ranking();
  tokens.dataset.source = state.colour === 'activation' ? 'activation' : src;
  box.append(tokens);
  const rank = ranking(), own = trace && trace.scores && trace.scores[rank] !== undefined;
  box.append(el('p', {class: 'small muted', text: trace
    ? `Latent ${state.latent}: ${own && rank !== 'gradsae' ? `${nameOf(rank)} score ${fmt(trace.scores[rank])}, ` : ''}GradSAE score ${fmt(trace.gradsae)}, mean activation ${fmt(trace.mean_activation)}; active at ${trace.positions.length} of ${ex.tokens.length} tokens. Dotted: tokens generated before the answer step.`
    : `Latent ${state.latent} is not active in this example.`}));
  box.append(answers(ex));
  return box;
}

function chips(ex) {
  // the chosen ranking's TopK (#topk-list), then the activation TopK (GradSAE's when activation is chosen)
  const rank = ranking(), other = rank === 'activation' ? 'gradsae' : 'activation';
  const first = topSet(ex, rank), second = topSet(ex, other);
  const wrap = el('div', {});
  for (const method of [rank, other]) {
    if (!ex.top[method]) continue;
    const row = el('div', {class: 'chips', 'data-method': method});
    if (method === rank) row.id = 'topk-list';
    for (const [latent, score] of ex.top[method]) {
      const both = first.has(latent) && second.has(latent);
      row.append(el('span', {class: `chip ${method === 'activation' ? 'act' : 'grad'}${both ? ' both' : ''}${latent === state.latent ? ' sel' : ''}`,
        'data-latent': latent, title: both ? `in both TopK sets (${nameOf(rank)}, ${nameOf(other)})` : `only in the ${nameOf(method)} TopK`,
        onclick: () => { state.latent = latent; renderExamples(); showCard(latent); }}, `${latent} `, el('span', {class: 'muted', text: fmt(score)})));
    }
    if (!ex.top[method].length) row.append(el('span', {class: 'small muted', text: 'no latent with a positive score'}));
    wrap.append(el('div', {class: 'label', text: `${nameOf(method)} TopK (${WHAT[method] || method})`}), row);
  }
  return wrap;
}

function colourControls(src) {
  const mk = (kind, label) => el('button', {id: `colour-${kind}`, class: state.colour === kind ? 'on' : '',
    onclick: () => { state.colour = kind; renderExamples(); }}, label);
  const legend = el('span', {class: 'legend'});
  legend.style.background = state.colour === 'activation'
    ? 'linear-gradient(90deg,#fff,rgba(217,119,6,.85))'
    : 'linear-gradient(90deg,rgba(37,99,235,.85),#fff,rgba(192,57,43,.85))';
  const what = src === 'gradsae' ? 'influence H\u00b7dY/dH' : `${nameOf(src)} attribution`;
  const none = src === 'gradsae' && ranking() !== 'gradsae' ? ` (the ${nameOf(ranking())} ranking has no per-token values: GradSAE's influence shown)` : '';
  const words = state.colour === 'activation' ? 'activation H[n,c]: 0 \u2192 max' : `${what}: lowers Y \u2190 0 \u2192 raises Y${none}`;
  return el('div', {class: 'controls'}, 'Colour by ', el('span', {class: 'toggle'}, mk('influence', src === 'gradsae' ? 'influence' : nameOf(src)), mk('activation', 'activation')),
    ` latent ${state.latent} `, legend, el('span', {class: 'small muted', text: words}));
}

function answers(ex) {
  if (!Object.keys(ex.masked).length) return el('p', {}, el('b', {text: "Model's answer: "}), ex.answer);
  const wrap = el('div', {});
  wrap.append(el('h3', {text: 'Answers'}));
  const table = el('table', {class: 'answers'});
  table.append(el('tr', {}, el('th', {text: 'condition'}), el('th', {text: 'answer'})));
  table.append(el('tr', {}, el('td', {text: 'model (SAE spliced, no edit)'}), el('td', {text: ex.answer})));
  const base = ex.masked.none !== undefined ? ex.masked.none : ex.answer;
  for (const [key, text] of Object.entries(ex.masked)) {
    if (key === 'none') continue;
    const [method, set, k] = key.split('/');
    const label = `mask ${nameOf(method)} ${set === 'top' ? 'TopK' : 'BottomK'}, K=${k}`;
    table.append(el('tr', {}, el('td', {text: label}), el('td', {class: text === base ? '' : 'changed', text: text})));
  }
  wrap.append(table);
  return wrap;
}

// -- latents view ----------------------------------------------------------------------------
const COLUMNS = [
  ['latent', 'latent', 'latent id'],
  ['n_grad', 'GradSAE TopK', 'examples whose GradSAE TopK holds it'],
  ['n_act', 'activation TopK', 'examples whose activation TopK holds it'],
  ['influence', 'influence', 'mean GradSAE score over those examples'],
  ['activation_mean', 'activation', 'mean activation over those examples'],
  ['density', 'density', 'share of corpus tokens where it fires (card)'],
  ['max_act', 'max act', 'largest corpus activation (card)'],
];
function columns() {
  // the chosen ranking's own columns when it is neither GradSAE nor activation
  const rank = ranking();
  if (rank === 'gradsae' || rank === 'activation') return COLUMNS;
  return [...COLUMNS, ['n_rank', `${nameOf(rank)} TopK`, `examples whose ${nameOf(rank)} TopK holds it`],
    ['score_rank', `${nameOf(rank)} score`, `mean ${nameOf(rank)} score over the examples where it is in some TopK`]];
}
function latentValue(row, key) {
  if (key === 'n_grad') return row.gradsae.length;
  if (key === 'n_act') return row.activation.length;
  if (key === 'n_rank') return ((row.in_top || {})[ranking()] || []).length;
  if (key === 'score_rank') { const s = (row.scores || {})[ranking()]; return s === undefined ? null : s; }
  return row[key];
}
function visibleLatents() {
  const q = state.query.trim();
  return layer().latents.filter((r) => {
    if (q && !String(r.latent).startsWith(q)) return false;
    const g = r.gradsae.length > 0, a = r.activation.length > 0;
    return state.filter === 'all' || (state.filter === 'rank' && latentValue(r, 'n_rank') > 0) || (state.filter === 'grad' && g) || (state.filter === 'act' && a)
      || (state.filter === 'grad-only' && g && !a) || (state.filter === 'act-only' && a && !g) || (state.filter === 'both' && a && g);
  }).sort((x, y) => {
    const u = latentValue(x, state.sort), v = latentValue(y, state.sort);
    const d = (u === null ? -Infinity : u) - (v === null ? -Infinity : v);
    return state.desc ? -d : d;
  });
}
function renderLatents() {
  const view = $('#view-latents');
  view.replaceChildren();
  if (!DATA.layers.length) return;
  const search = el('input', {id: 'latent-search', type: 'search', placeholder: 'latent id', value: state.query,
    oninput: (e) => { state.query = e.target.value; renderLatentRows(); }});
  const filter = el('select', {id: 'latent-filter', onchange: (e) => { state.filter = e.target.value; renderLatentRows(); }});
  const own = ['gradsae', 'activation'].includes(ranking()) ? [] : [['rank', `in a ${nameOf(ranking())} TopK`]];
  for (const [v, t] of [['all', 'all latents'], ...own, ['grad', 'in a GradSAE TopK'], ['act', 'in an activation TopK'], ['grad-only', 'only GradSAE TopK'], ['act-only', 'only activation TopK'], ['both', 'in both']]) {
    const opt = el('option', {value: v, text: t}); if (v === state.filter) opt.selected = true; filter.append(opt);
  }
  const sort = el('select', {id: 'latent-sort', onchange: (e) => { state.sort = e.target.value; state.desc = true; renderLatentRows(); }});
  for (const [key, label] of columns()) { const opt = el('option', {value: key, text: `sort by ${label}`}); if (key === state.sort) opt.selected = true; sort.append(opt); }
  view.append(layerPicker(), rankingPicker('latent-ranking'), el('div', {class: 'controls'}, 'Search ', search, filter, sort, el('span', {id: 'latent-count', class: 'muted small'})));
  const head = el('tr', {});
  for (const [key, label, title] of columns()) {
    head.append(el('th', {'data-sort': key, title: title, onclick: () => { state.desc = state.sort === key ? !state.desc : true; state.sort = key; renderLatents(); }},
      label + (state.sort === key ? (state.desc ? ' \u25bc' : ' \u25b2') : '')));
  }
  view.append(el('table', {id: 'latent-table'}, el('thead', {}, head), el('tbody', {})));
  const meta = layer().cards_meta;
  view.append(el('p', {class: 'small muted', text: meta.corpus
    ? `Cards: ${meta.n_sequences} sequences x ${meta.context} tokens of ${meta.corpus}. ${meta.logit_lens}.`
    : 'No feature cards for this layer: run `gradsae cards --run RUN_DIR --layer L` for density, contexts and the logit lens.'}));
  renderLatentRows();
}
function renderLatentRows() {
  const body = $('#latent-table tbody');
  const rows = visibleLatents();
  body.replaceChildren(...rows.map((r) => {
    const tr = el('tr', {class: 'latent-row' + (r.latent === state.latent ? ' sel' : ''), 'data-latent': r.latent, onclick: () => { state.latent = r.latent; showCard(r.latent); renderLatentRows(); }});
    for (const [key] of columns()) {
      const v = latentValue(r, key);
      tr.append(el('td', {text: Number.isInteger(v) && !['influence', 'activation_mean', 'score_rank'].includes(key) ? String(v) : fmt(v)}));
    }
    return tr;
  }));
  $('#latent-count').textContent = `${rows.length} of ${layer().latents.length} latents`;
}

// -- the card -----------------------------------------------------------------------------------
function showCard(latent) {
  const box = $('#card');
  box.replaceChildren();
  box.dataset.latent = latent;
  const L = layer();
  const card = L.cards[String(latent)];
  const row = L.latents.find((r) => r.latent === latent);
  box.append(el('h2', {id: 'card-title', text: `Latent ${latent} \u00b7 layer ${L.layer}`}));
  if (row) box.append(inRun(row));
  if (!card) {
    box.append(el('p', {class: 'muted', text: 'No feature card for this latent: run `gradsae cards --run RUN_DIR` (or --latents) to add corpus contexts, density and the logit lens.'}));
    return;
  }
  box.append(el('table', {class: 'stats'},
    el('tr', {}, el('th', {text: 'density'}), el('td', {text: `${(100 * card.density).toFixed(2)}% of tokens`}), el('th', {text: 'max act'}), el('td', {text: fmt(card.max_activation)})),
    el('tr', {}, el('th', {text: 'mean act'}), el('td', {text: fmt(card.mean_activation)}), el('th', {text: 'mean influence'}), el('td', {text: fmt(card.mean_influence)}))));
  box.append(el('div', {class: 'label', text: 'Activation histogram (nonzero, corpus)'}), histogram(card.hist_edges, card.hist_counts, '#d97706'));
  box.append(el('div', {class: 'label', text: 'Logit lens of the decoder direction'}),
    el('div', {class: 'logit'}, tokenList('promoted', card.promoted, 'pos'), tokenList('suppressed', card.suppressed, 'neg')));
  box.append(contexts('Top corpus contexts by influence', card.top_influence, 'influence'));
  box.append(contexts('Top corpus contexts by activation', card.top_activation, 'activation'));
}
function inRun(row) {
  const wrap = el('div', {class: 'small'});
  for (const method of new Set([ranking(), 'gradsae', 'activation'])) {
    const ids = (row.in_top || {})[method] || row[method] || [];
    const line = el('div', {}, el('b', {text: `In ${nameOf(method)} TopK of ${ids.length} example${ids.length === 1 ? '' : 's'}`}), ids.length ? ': ' : '');
    ids.forEach((id, i) => { line.append(el('a', {class: 'link', text: `#${id}`, onclick: () => goToExample(id)}), i + 1 < ids.length ? ', ' : ''); });
    wrap.append(line);
  }
  return wrap;
}
function goToExample(id) {
  const i = layer().examples.findIndex((e) => e.id === id);
  if (i < 0) return;
  const keep = state.latent;
  state.example = i; state.latent = keep; selectTab('examples'); renderExamples();
}
function tokenList(title, pairs, cls) {
  const wrap = el('div', {class: cls}, el('div', {class: 'small muted', text: title}));
  for (const [t, v] of pairs) wrap.append(el('span', {title: fmt(v), text: shown(JSON.stringify(t).slice(1, -1))}));
  return wrap;
}
function contexts(title, list, kind) {
  const wrap = el('div', {class: 'contexts'}, el('div', {class: 'label', text: title}));
  if (!list.length) wrap.append(el('div', {class: 'small muted', text: 'none above zero'}));
  for (const c of list) {
    const vals = kind === 'activation' ? c.activation : c.influence;
    const titles = c.tokens.map((t, i) => `activation ${fmt(c.activation[i])}, influence ${fmt(c.influence[i])}`);
    const box = tokenSpans(c.tokens, vals, kind, {cls: 'ctx', peak: c.peak, titles: titles});
    box.prepend(el('span', {class: 'val', text: fmt(c.value)}));
    wrap.append(box);
  }
  return wrap;
}
function histogram(edges, counts, color) {
  const W = 400, H = 70, n = counts.length;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('width', W); svg.setAttribute('height', H + 14); svg.setAttribute('class', 'hist');
  const top = Math.max(1, ...counts);
  counts.forEach((c, i) => {
    const r = document.createElementNS(svg.namespaceURI, 'rect');
    const h = (H * c) / top;
    r.setAttribute('x', (i * W) / n); r.setAttribute('y', H - h); r.setAttribute('width', W / n - 1); r.setAttribute('height', h); r.setAttribute('fill', color);
    const t = document.createElementNS(svg.namespaceURI, 'title'); t.textContent = `${fmt(edges[i])} to ${fmt(edges[i + 1])}: ${c}`; r.append(t);
    svg.append(r);
  });
  if (edges.length) for (const [x, v, a] of [[0, edges[0], 'start'], [W, edges[edges.length - 1], 'end']]) {
    const t = document.createElementNS(svg.namespaceURI, 'text');
    t.setAttribute('x', x); t.setAttribute('y', H + 12); t.setAttribute('font-size', 10); t.setAttribute('text-anchor', a); t.textContent = fmt(v); svg.append(t);
  }
  return svg;
}

// -- tabs ---------------------------------------------------------------------------------------
function selectTab(name) {
  for (const b of document.querySelectorAll('.tab')) b.classList.toggle('active', b.dataset.tab === name);
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${name}`;
  document.querySelector('main').classList.toggle('wide', name === 'overview');
}
function render() {
  renderExamples(); renderLatents();
  if (state.latent !== null) showCard(state.latent);
}
for (const b of document.querySelectorAll('.tab')) {
  b.addEventListener('click', () => { selectTab(b.dataset.tab); if (b.dataset.tab === 'examples') renderExamples(); });
}
for (const note of DATA.notes || []) $('#notes').append(el('p', {text: note}));
if (!DATA.layers.length) selectTab('overview');
render();
})();
