/**
 * Vitest global setup: one cluster for the test files (server heartbeat 1 s), stopped at the
 * end whatever happened. Test files read its port and directory with inject().
 */

import type { TestProject } from "vitest/node";
import { helper, python, startCluster } from "./cluster.js";

declare module "vitest" {
  export interface ProvidedContext {
    httpPort: number;
    dataDir: string;
    python: string;
    helper: string;
  }
}

export default async function setup(project: TestProject) {
  const cluster = await startCluster({
    env: { ENGRAM_WS_HEARTBEAT_S: "1", ENGRAM_WS_IDLE_TIMEOUT_S: "10" },
  });
  project.provide("httpPort", cluster.httpPort);
  project.provide("dataDir", cluster.dataDir);
  project.provide("python", python);
  project.provide("helper", helper);
  return cluster.stop;
}
