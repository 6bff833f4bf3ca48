import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { inject } from "vitest";

const run = promisify(execFile);

export const httpPort = () => inject("httpPort");
export const wsUrl = () => `ws://127.0.0.1:${inject("httpPort")}/v1/stream`;

let counter = 0;
/** A fresh memory space per test (the cluster is shared). */
export function space(prefix: string): string {
  counter += 1;
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}

/** Every observation id of a space, read back over gRPC by the Python helper. */
export async function listSpace(
  spaceId: string,
  dataDir = inject("dataDir"),
  apiKey?: string,
): Promise<string[]> {
  const clusterFile = join(dataDir, "cluster.json");
  const key = apiKey ? ["--api-key", apiKey] : [];
  const { stdout } = await run(
    inject("python"),
    [inject("helper"), "list", "--cluster-file", clusterFile, "--space", spaceId, ...key],
    { maxBuffer: 64 * 1024 * 1024 },
  );
  return (JSON.parse(stdout) as { ids: string[] }).ids;
}

/** PID of a process of the cluster (e.g. "gateway"), from the launcher's cluster.json. */
export function pidOf(name: string): number {
  const file = join(inject("dataDir"), "cluster.json");
  const topo = JSON.parse(readFileSync(file, "utf8")) as {
    processes: { name: string; pid: number | null }[];
  };
  const proc = topo.processes.find((p) => p.name === name);
  if (!proc?.pid) throw new Error(`no running ${name} in ${file}`);
  return proc.pid;
}

/** Deterministic pseudo-random unit-ish vectors. */
export function vectors(n: number, dim: number, seed: number): Float32Array {
  const out = new Float32Array(n * dim);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < out.length; i++) {
    x = (x * 1103515245 + 12345) % 2147483648;
    out[i] = x / 2147483648 - 0.5;
  }
  return out;
}

export async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
