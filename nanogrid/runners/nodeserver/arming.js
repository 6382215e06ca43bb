'use strict';
// The Worker armed for the next call: the one the last call ran in when it can serve another
// (worker.js), else a new one started between runs (off the call's path); either way it has
// required the files this sandbox preloads before a call takes it.

const { Worker } = require('worker_threads');
const { BOOTING, BOOTED, WORKER_SOURCE, sharedState } = require('./worker');
const { PRELOAD_BUDGET_MS, USES } = require('./preload');

const BOOT_WAIT_MS = 5000;

class NextWorker {
  // `warmupPath`: the empty module each Worker runs first; `preload`: what they preload.
  constructor(warmupPath, preload) {
    this.warmupPath = warmupPath;
    this.preload = preload;
    this.armed = null;
    this.idle = null;
    this.settled = null;
  }

  // Arms the next call's Worker, unless one is armed: the last call's, else a new one.
  arm() {
    if (this.armed !== null) return;
    const idle = this.idle;
    this.idle = null;
    this.armed = idle === null ? this.spawn() : this.prepare(idle);
  }

  // A Worker whose call has ended and that can serve another: armed again by `arm`.
  keep(armed) {
    this.idle = armed;
    this.watch(armed);
  }

  // Ends the Workers kept for the next call (an idle sandbox's ~8 MiB), then calls `done`;
  // the next call starts one (`take`), its next run's 'A' arms one again.
  drop(done) {
    const kept = [this.armed, this.idle].filter((armed) => armed !== null);
    this.armed = null;
    this.idle = null;
    this.settled = null;
    for (const armed of kept) clearTimeout(armed.budget);
    Promise.all(kept.map((armed) => armed.worker.terminate())).then(() => done(), () => done());
  }

  // Calls `done` once nothing in this process runs but what waits for a call: the armed
  // Worker has booted with its preloads (the function's files), or none is armed. The agent
  // freezes the sandbox then, until its next call (nanogrid/runners/freezer.py); a call taken first
  // calls it off (`take`).
  whenSettled(done) {
    this.settled = done;
    this.check();
  }

  check() {
    const { armed, settled } = this;
    if (settled === null || (armed !== null && Atomics.load(armed.state, 0) !== BOOTED)) return;
    this.settled = null;
    settled();
  }

  // A new Worker that boots and requires `files`; past its budget it is ended.
  spawn(files = this.preload.files) {
    const { state, began } = sharedState();
    const { key, env, main } = this.preload;
    const uses = Object.keys(USES);
    const workerData = { warmup: this.warmupPath, state, began, files, env, main, uses };
    const options = { eval: true, stdout: true, stderr: true, env: {}, workerData };
    const worker = new Worker(WORKER_SOURCE, options);
    worker.stdout.resume(); // a call's output comes as messages; this is what fd-less writes left
    worker.stderr.resume();
    const armed = { worker, state, began, files, key, deadline: 0, overBudget: false };
    this.watch(armed);
    return this.boot(armed);
  }

  // The Worker `armed` that served a call, asked to require `files` for the next one.
  prepare(armed, files = this.preload.files) {
    const { key, env, main } = this.preload;
    Object.assign(armed, { files, key, overBudget: false });
    Atomics.store(armed.state, 0, BOOTING);
    Atomics.store(armed.state, 1, -1);
    Atomics.store(armed.state, 2, 0);
    Atomics.store(armed.began, 0, 0n);
    if (files.length === 0) Atomics.store(armed.state, 0, BOOTED);
    else armed.worker.postMessage({ files, env, main });
    return this.boot(armed);
  }

  // While `armed` waits for a call: a death is noticed (and judged) by its exit.
  watch(armed) {
    const { worker } = armed;
    worker.removeAllListeners('message');
    worker.removeAllListeners('error');
    worker.removeAllListeners('exit');
    worker.on('error', () => {}); // before a run: noticed by its exit; in a run: see server.js
    worker.once('exit', () => {
      if (this.idle === armed) this.idle = null;
      if (this.armed !== armed) return;
      this.armed = null; // died waiting: re-armed without what killed it, or on demand
      if (this.preload.judge(armed)) this.armed = this.spawn();
      this.check();
    });
  }

  // Waits (asynchronously) for `armed` to be ready, at most its preload budget (this time's:
  // a Worker that served a call is readied again, and an earlier budget is not this one).
  boot(armed) {
    const { worker, state, files } = armed;
    armed.deadline = Date.now() + PRELOAD_BUDGET_MS;
    const boot = Atomics.waitAsync(state, 0, BOOTING, PRELOAD_BUDGET_MS + BOOT_WAIT_MS);
    if (boot.async) boot.value.then(() => this.check());
    clearTimeout(armed.budget);
    if (files.length > 0) {
      armed.budget = setTimeout(() => {
        if (this.armed !== armed || Atomics.load(state, 0) !== BOOTING) return;
        armed.overBudget = true;
        worker.terminate();
      }, PRELOAD_BUDGET_MS).unref();
    }
    return armed;
  }

  // The armed Worker once it is ready (one without preloads if it preloaded another key or
  // failed), and since when the call waited for preloads (null: it did not): that wait is in
  // the run's time, as the call would have required those files itself; a Worker's plain
  // start is not.
  take(key) {
    const arrived = process.hrtime.bigint();
    this.settled = null;
    if (this.armed === null && this.idle !== null) {
      this.armed = this.prepare(this.idle, []);
      this.idle = null;
    }
    const armed = this.armed || this.spawn();
    this.armed = null;
    if (armed.files.length === 0) {
      // A Worker still booting opens files on its own thread: one could take fd 0 between
      // stageStdin's close and open (server.js). Wait (at most BOOT_WAIT_MS) until it has
      // booted.
      Atomics.wait(armed.state, 0, BOOTING, BOOT_WAIT_MS);
      return [armed, null];
    }
    let waited = null;
    if (armed.key === key) { // wait until its preloads are over, at most until its budget is
      Atomics.wait(armed.state, 0, BOOTING, Math.max(0, armed.deadline - Date.now()));
      const [phase, began] = [Atomics.load(armed.state, 0), Atomics.load(armed.began, 0)];
      waited = began > arrived ? began : arrived;
      if (phase === BOOTED) return [armed, waited];
      armed.overBudget = phase === BOOTING;
      this.preload.judge(armed);
    }
    armed.worker.terminate();
    this.armed = this.spawn([]);
    return [this.take(key)[0], waited];
  }
}

module.exports = { NextWorker };
