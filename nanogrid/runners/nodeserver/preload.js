'use strict';
// Import-warm ("preload": the agent's code_key, or null): the first run of a key names the
// files it loaded from its own directory (require.cache but its main script); from then on
// every Worker requires them while it waits, so a call runs its main script with them loaded,
// still in a Worker of its own (module state is never shared between calls). A file whose
// require throws, writes to stdout or stderr, reads the call's environment or stdin, starts
// a timer, leaves a handle open or ends its Worker, or that does not load within
// PRELOAD_BUDGET_MS (with those before it), is left out for good: its Worker is discarded and
// every call requires it itself, as without preloading. The stand-ins that notice those are
// in worker.js; this file keeps the verdicts. What they cannot notice (an interval set through
// another reference, a Worker or a process of its own) stops when the Worker is ready: the
// agent freezes the sandbox then, until its next call (frame 'W', nanogrid/runners/freezer.py).

const path = require('path');
const { BOOTED } = require('./worker');

const PRELOAD_BUDGET_MS = 2000;
// What a preloading file may have done, each a bit of a Worker's shared state, in this order.
const USES = {
  threw: 'its require threw', output: 'it writes to stdout or stderr',
  env: "it reads the call's environment", stdin: 'it reads stdin',
  timer: 'it starts a timer', handle: 'it leaves a handle open',
};

// What this sandbox's Workers preload: the files the first run of its key loaded, less those
// a Worker left out. `env`: the names of that run's environment (every call's, by contract).
class Preload {
  constructor() {
    Object.assign(this, { key: null, env: [], files: [], main: '', leftOut: {}, reported: '' });
  }

  learn(key, env, files, main) {
    Object.assign(this, { key, env: Object.keys(env), files, main });
  }

  // Leaves out what made `armed` fail, if anything did; true when it left a file out.
  judge(armed) {
    const [phase, index, uses] = Array.from(armed.state, (_, i) => Atomics.load(armed.state, i));
    if (phase === BOOTED || index < 0) return false; // booted, or died before preloading
    let why = 'it ended its Worker (process.exit or an uncaught error)';
    if (uses !== 0) {
      why = Object.values(USES).filter((_, bit) => uses & (1 << bit)).join(', ');
    } else if (armed.overBudget) {
      why = `the preloads took longer than ${PRELOAD_BUDGET_MS} ms`;
      for (const file of armed.files.slice(index + 1)) this.leftOut[name(file)] = 'not tried';
    }
    this.leftOut[name(armed.files[index])] = why;
    this.files = this.files.filter((file) => !(name(file) in this.leftOut));
    return true;
  }

  // What a run of `key` in a Worker that preloaded `files` tells the agent, if it is news.
  report(key, files) {
    if (key === null || key !== this.key) return undefined;
    const report = { preloaded: files.map(name), left_out: this.leftOut };
    const text = JSON.stringify(report);
    if (text === this.reported) return undefined;
    this.reported = text;
    return report;
  }
}

function name(file) { // as the function's directory (this process's cwd) names it
  return path.relative(process.cwd(), file);
}

module.exports = { PRELOAD_BUDGET_MS, Preload, USES };
