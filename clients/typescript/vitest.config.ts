import { defineConfig } from "vitest/config";

// The tests talk to a real cluster that test/global-setup.ts starts (and stops) once; files run
// one after another because one of them restarts the gateway.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/global-setup.ts"],
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 90_000,
  },
});
