/**
 * A real Engram Stream cluster for the tests: `python -m engram.cli up` on free ports in a
 * temporary directory, healthy once the gateway's /healthz answers, stopped by PID: SIGTERM to
 * the launcher (which stops gateway, shards and Redis), SIGKILL after a timeout, then SIGKILL to
 * any child still listed in cluster.json.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const root = resolve(here, "../../..");
export const helper = join(here, "engram_helper.py");
export const python = process.env.ENGRAM_PYTHON ?? join(root, ".venv/bin/python");

export interface Cluster {
  httpPort: number;
  dataDir: string;
  stop: () => Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => res(port));
    });
  });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function isOurs(pid: number): boolean {
  try {
    const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return cmd.includes("engram") || cmd.includes("redis-server");
  } catch {
    return false;
  }
}

async function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return true;
  return new Promise((res) => {
    const t = setTimeout(() => res(false), ms);
    child.once("exit", () => {
      clearTimeout(t);
      res(true);
    });
  });
}

async function waitHealthy(url: string, child: ChildProcess, log: string, ms: number) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      throw new Error(`engram up exited with ${child.exitCode}:\n${tail(log)}`);
    }
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {
      /* not up yet */
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`the cluster was not healthy after ${ms} ms:\n${tail(log)}`);
}

function tail(path: string): string {
  try {
    return readFileSync(path, "utf8").split("\n").slice(-40).join("\n");
  } catch {
    return "(no log)";
  }
}


/** Starts a cluster (`env` adds ENGRAM_* settings) and waits until its gateway is healthy. */
export async function startCluster(
  opts: { shards?: number; env?: Record<string, string> } = {},
): Promise<Cluster> {
  if (!existsSync(python)) {
    throw new Error(`${python} not found: run \`make setup\` at the repository root first`);
  }
  const dataDir = mkdtempSync(join(tmpdir(), "engram-ts-"));
  const httpPort = await freePort();
  const log = join(dataDir, "engram-up.log");
  const out = openSync(log, "a");
  const child = spawn(
    python,
    [
      "-m",
      "engram.cli",
      "up",
      "--data-dir",
      dataDir,
      "--grpc-port",
      "0",
      "--http-port",
      String(httpPort),
      "--shards",
      String(opts.shards ?? 2),
    ],
    {
      cwd: root,
      stdio: ["ignore", out, out],
      env: {
        ...process.env,
        // the launcher forks its children while using gRPC: keep gRPC's fork handlers off
        // (they can abort a child before exec, grpc/grpc#43055)
        GRPC_ENABLE_FORK_SUPPORT: "0",
        ...opts.env,
      },
    },
  );

  const stop = async () => {
    if (child.pid !== undefined && alive(child.pid)) {
      child.kill("SIGTERM");
      if (!(await waitExit(child, 20_000))) {
        child.kill("SIGKILL");
        await waitExit(child, 5_000);
      }
    }
    // children the launcher could not stop (it was killed): by PID, from cluster.json
    const file = join(dataDir, "cluster.json");
    if (existsSync(file)) {
      const topo = JSON.parse(readFileSync(file, "utf8")) as { processes: { pid: number | null }[] };
      for (const p of topo.processes) {
        if (p.pid && alive(p.pid) && isOurs(p.pid)) process.kill(p.pid, "SIGKILL");
      }
    }
    rmSync(dataDir, { recursive: true, force: true });
  };

  try {
    await waitHealthy(`http://127.0.0.1:${httpPort}/healthz`, child, log, 90_000);
  } catch (err) {
    await stop();
    throw err;
  }
  return { httpPort, dataDir, stop };
}
