// What every `microvpcd <service>` shares: flags (each also an environment
// variable), logging (every line with the host id and the version; inside a
// call, its request id: tracing.ts), tracing (OpenTelemetry over OTLP when an
// endpoint is configured), Redis, metrics, the gRPC server, signal handling.
import { readFileSync } from "node:fs";
import { Command, Option } from "commander";
import { pino, type Logger } from "pino";
import type { Redis } from "ioredis";
import { ReadyChecks, redisReachable, SharedReadiness } from "./health.js";
import { defaultHostId } from "./host.js";
import { serveMetrics, setDefaultLabels, watchRedis } from "./metrics.js";
import { connectRedis, readRedisSecrets, urlHasPassword, urlHasUser, waitReady } from "./redis.js";
import { notifyReadyWhen } from "./sd-notify.js";
import { isLoopback, listenerRefusal, parseListen, startGrpcServer, type RunningServer, type ServiceBinding } from "./server.js";
import { logMixin, startTracing, stopTracing, tracingConfig } from "./tracing.js";
import { storedInt } from "./validate.js";
import { BUILD, versionLine } from "./version.js";
import { useExecHelper } from "./exec.js";

export interface CommonFlags {
  listen: string;
  metricsListen: string;
  redis: string;
  token?: string;
  tokenFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsClientCa?: string;
  tlsReloadIntervalMs: string;
  healthListen?: string;
  insecurePlaintext?: boolean;
  redisPasswordFile?: string;
  redisUser?: string;
  redisTlsCa?: string;
  redisTlsCert?: string;
  redisTlsKey?: string;
  redisSentinelPasswordFile?: string;
  logLevel: string;
  redisTimeoutMs: string;
  otlpEndpoint?: string;
}

export interface ServiceContext {
  flags: CommonFlags & Record<string, unknown>;
  logger: Logger;
  redis: Redis;
}

export interface ServiceDefinition {
  name: string;
  summary: string;
  defaultPort: number;
  /** Extra flags of this service. */
  options?: Option[];
  /**
   * The service's bindings; `ready` its readiness conditions (default: its
   * Redis answers PING), served by grpc.health.v1 and /readyz alike.
   */
  build(ctx: ServiceContext): Promise<{ services: ServiceBinding[]; ready?: ReadyChecks; close?: () => Promise<void> }>;
  /** Added to the "serving" log line (e.g. whether nft runs in-process). */
  startInfo?: () => Record<string, unknown>;
}

export function addServiceCommand(program: Command, def: ServiceDefinition): void {
  const env = (s: string) => `MICROVPC_${s}`;
  const cmd = program
    .command(def.name)
    .description(def.summary)
    .version(versionLine(), "--version", "print the version (package, commit, node) and exit")
    .addOption(new Option("--listen <host:port>", "gRPC listen address").env(env("LISTEN")).default(`127.0.0.1:${def.defaultPort}`))
    .addOption(
      new Option("--metrics-listen <host:port>", "Prometheus /metrics listen address")
        .env(env("METRICS_LISTEN"))
        .default(`127.0.0.1:${def.defaultPort + 2000}`),
    )
    .addOption(
      new Option(
        "--redis <url>",
        "Redis URL holding shared state: redis://host:port/db, a Redis behind Sentinel as redis-sentinel://host:port,host:port,.../<master name> (the sentinels), or a Redis Cluster as redis-cluster://host:port,host:port,... (its seeds; no password in any: use --redis-password-file)",
      )
        .env(env("REDIS_URL"))
        .default("redis://127.0.0.1:6379/0"),
    )
    .addOption(
      new Option("--redis-password-file <path>", "read the Redis password (AUTH) from a file, so it is in no URL, variable or argv").env(
        env("REDIS_PASSWORD_FILE"),
      ),
    )
    .addOption(
      new Option(
        "--redis-user <name>",
        "Redis ACL user to AUTH as, with the password from the password file (microvpc-control, microvpc-host-<host id>: see `microvpcd redis-acl`); default: Redis's default user",
      ).env(env("REDIS_USER")),
    )
    .addOption(new Option("--redis-tls-ca <path>", "CA (PEM) that signed Redis's certificate; connects over TLS").env(env("REDIS_TLS_CA")))
    .addOption(new Option("--redis-tls-cert <path>", "client certificate (PEM) for Redis over TLS").env(env("REDIS_TLS_CERT")))
    .addOption(new Option("--redis-tls-key <path>", "client private key (PEM) for Redis over TLS").env(env("REDIS_TLS_KEY")))
    .addOption(
      new Option(
        "--redis-sentinel-password-file <path>",
        "with a redis-sentinel:// URL whose sentinels have requirepass: read their password from a file (default: no AUTH to the sentinels)",
      ).env(env("REDIS_SENTINEL_PASSWORD_FILE")),
    )
    .addOption(
      new Option("--redis-timeout-ms <ms>", "per-command Redis timeout; slower answers become UNAVAILABLE").env(env("REDIS_TIMEOUT_MS")).default("2000"),
    )
    .addOption(new Option("--token <token>", "require 'authorization: Bearer <token>' on every call (health checks excepted)").env(env("TOKEN")))
    .addOption(new Option("--token-file <path>", "read the bearer token from a file (preferred over --token: not visible in ps)").env(env("TOKEN_FILE")))
    .addOption(new Option("--tls-cert <path>", "TLS certificate (PEM); with --tls-key serves gRPC over TLS").env(env("TLS_CERT")))
    .addOption(new Option("--tls-key <path>", "TLS private key (PEM)").env(env("TLS_KEY")))
    .addOption(
      new Option("--tls-client-ca <path>", "mutual TLS: require a client certificate signed by this CA (PEM); needs --tls-cert/--tls-key").env(
        env("TLS_CLIENT_CA"),
      ),
    )
    .addOption(
      new Option(
        "--tls-reload-interval-ms <ms>",
        "how often the TLS certificate, key and client CA files are read again; a renewed set that fits is served to new connections without a restart (0: never)",
      )
        .env(env("TLS_RELOAD_INTERVAL_MS"))
        .default("60000"),
    )
    .addOption(
      new Option(
        "--insecure-plaintext",
        "accept a bearer token over plaintext on a non-loopback --listen (the token travels in clear text: only on a network encrypted and trusted otherwise)",
      )
        .env(env("INSECURE_PLAINTEXT"))
        .default(false),
    )
    .addOption(
      new Option(
        "--health-listen <host:port>",
        "also serve grpc.health.v1 alone, in plaintext and without auth, on this address (for kubelet probes when the gRPC port wants TLS or a token)",
      ).env(env("HEALTH_LISTEN")),
    )
    .addOption(
      new Option(
        "--otlp-endpoint <url>",
        "export OpenTelemetry spans over OTLP/HTTP to this base URL (spans go to <url>/v1/traces; OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT work too); none: no tracing",
      ).env(env("OTLP_ENDPOINT")),
    )
    .addOption(new Option("--log-level <level>", "pino log level").env(env("LOG_LEVEL")).choices(["trace", "debug", "info", "warn", "error"]).default("info"));
  for (const o of def.options ?? []) cmd.addOption(o);
  cmd.action(async (flags: CommonFlags & Record<string, unknown>) => {
    // A daemon without --host-id (ipam) is on this machine: its default id.
    const hostId = typeof flags.hostId === "string" ? flags.hostId : defaultHostId();
    const logger = pino({
      level: flags.logLevel,
      base: { service: def.name, pid: process.pid, hostId, version: BUILD.version },
      mixin: logMixin,
    });
    // A secret on the command line is in /proc/<pid>/cmdline, readable by every user of the host.
    if (cmd.getOptionValueSource("token") === "cli")
      logger.warn("--token on the command line shows the token to every user of this host (ps); use --token-file");
    try {
      await runService(def, flags, logger, hostId);
    } catch (err) {
      logger.fatal({ err: (err as Error).message }, "cannot start");
      process.exit(1);
    }
  });
}

/**
 * The bearer token from --token-file (or --token). An empty or blank token is
 * refused: reading "" used to mean "no auth", so a truncated or unfilled
 * secret silently opened every RPC.
 */
export function readToken(flags: { token?: string; tokenFile?: string }, flag = "--token"): string | undefined {
  if (flags.tokenFile) {
    const t = readFileSync(flags.tokenFile, "utf8").trim();
    if (!t) throw new Error(`${flag}-file ${flags.tokenFile} is empty: refusing to start without the token it should hold (it would turn auth off)`);
    return t;
  }
  if (flags.token !== undefined && !flags.token.trim()) throw new Error(`${flag} is empty: give the token, or leave the option out`);
  return flags.token;
}

/** --redis-user: a plain ACL user name, and not also in the URL (ioredis would let the URL's win). */
export function checkRedisUser(url: string, user: string | undefined, passwordFile?: string): void {
  // Empty (MICROVPC_REDIS_USER="", as the dev manifests set it): Redis's default user.
  if (!user) return;
  // A user without a password would not AUTH at all: every command would run as "default".
  if (!passwordFile && !urlHasPassword(url)) throw new Error("--redis-user needs --redis-password-file (the user's password)");
  if (!/^[A-Za-z0-9_.@-]{1,128}$/.test(user)) throw new Error(`--redis-user ${JSON.stringify(user)}: use 1–128 characters of [A-Za-z0-9_.@-]`);
  if (urlHasUser(url)) throw new Error("--redis names a user and --redis-user gives one too: keep the user in --redis-user only");
}

async function runService(def: ServiceDefinition, flags: CommonFlags & Record<string, unknown>, logger: Logger, hostId: string): Promise<void> {
  const token = readToken(flags);
  // A bad --otlp-endpoint is refused before anything starts.
  tracingConfig(flags.otlpEndpoint);
  if ((flags.tlsCert && !flags.tlsKey) || (!flags.tlsCert && flags.tlsKey)) throw new Error("--tls-cert and --tls-key go together");
  // Before Redis or any service starts: a refused listener should change nothing.
  const refusal = listenerRefusal({
    host: parseListen(flags.listen).host,
    tls: !!flags.tlsCert,
    clientCa: !!flags.tlsClientCa,
    token: !!token,
    insecurePlaintext: !!flags.insecurePlaintext,
  });
  if (refusal) throw new Error(refusal);
  if (flags.healthListen) parseListen(flags.healthListen);
  // Commands start from a small helper process, never by forking this one (exec-helper.ts).
  const execHelper = useExecHelper();
  const redisSecrets = readRedisSecrets({
    passwordFile: flags.redisPasswordFile,
    tlsCa: flags.redisTlsCa,
    tlsCert: flags.redisTlsCert,
    tlsKey: flags.redisTlsKey,
    sentinelPasswordFile: flags.redisSentinelPasswordFile,
  });
  if (urlHasPassword(flags.redis)) {
    // ioredis lets the URL's password win; two sources would only confuse.
    if (flags.redisPasswordFile) throw new Error("--redis carries a password and --redis-password-file gives one too: keep the password in the file only");
    logger.warn("the Redis URL carries a password, which ps and the environment show; move it to --redis-password-file");
  }
  checkRedisUser(flags.redis, flags.redisUser, flags.redisPasswordFile);
  const m = parseListen(flags.metricsListen);
  if (!isLoopback(m.host)) logger.warn({ metrics: flags.metricsListen }, "metrics listener is not on loopback; it has no authentication");
  setDefaultLabels({ service: def.name });
  // Before the services are built: the sync loops' first passes are spans too.
  if (await startTracing({ service: def.name, hostId, endpoint: flags.otlpEndpoint })) logger.info("tracing: exporting spans over OTLP/HTTP");
  const redis = connectRedis({
    url: flags.redis,
    commandTimeoutMs: Number(flags.redisTimeoutMs),
    logger,
    ...(flags.redisUser ? { username: flags.redisUser } : {}),
    ...redisSecrets,
  });
  watchRedis(redis);
  // The first passes of the sync loops start as the services are built: give the connection a
  // moment (commands are not queued while it connects), but start without Redis too (a host keeps
  // forwarding; readiness says Redis is unreachable).
  await waitReady(redis, 3000).catch((err: Error) => logger.warn({ err: err.message }, "redis not reachable yet; starting anyway"));
  const built = await def.build({ flags, logger, redis });
  // One answer for grpc.health.v1 (both listeners) and /readyz.
  const checks = built.ready ?? new ReadyChecks([redisReachable(redis)]);
  const ready = new SharedReadiness(checks.check);
  const server: RunningServer = await startGrpcServer({
    listen: flags.listen,
    services: built.services,
    logger,
    ready,
    token,
    tlsCert: flags.tlsCert,
    tlsKey: flags.tlsKey,
    tlsClientCa: flags.tlsClientCa,
    tlsReloadMs: storedInt("--tls-reload-interval-ms", flags.tlsReloadIntervalMs, 0, 86_400_000),
    healthListen: flags.healthListen,
    insecurePlaintext: !!flags.insecurePlaintext,
  });
  const metrics = await serveMetrics(m.host, m.port, { get: () => ready.get(), problems: () => checks.problems() });
  logger.info(
    {
      listen: `${server.host}:${server.port}`,
      metrics: flags.metricsListen,
      health: server.healthPort !== undefined ? `${parseListen(flags.healthListen!).host}:${server.healthPort}` : undefined,
      auth: [token && "token", flags.tlsClientCa && "mtls"].filter(Boolean).join("+") || "none",
      tls: !!flags.tlsCert,
      exec: execHelper ? "helper process" : "execa in-process (MICROVPC_EXEC_HELPER=0)",
      // bin/microvpcd.js's #! line sets the young generation's size; a daemon
      // started another way (`node dist/microvpcd.js`) shows it lacks it here.
      nodeFlags: [...process.execArgv, ...(process.env.NODE_OPTIONS ? [`NODE_OPTIONS=${process.env.NODE_OPTIONS}`] : [])].join(" ") || "none",
      ...def.startInfo?.(),
    },
    `${def.name} serving`,
  );
  // Under systemd (Type=notify): READY=1 once the readiness check first passes.
  const notifying = new AbortController();
  void notifyReadyWhen(() => ready.get(), { signal: notifying.signal, logger });
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    notifying.abort();
    logger.info({ signal }, "shutting down");
    await server.close();
    metrics.close();
    await built.close?.();
    await stopTracing().catch((err: unknown) => logger.warn({ err: (err as Error).message }, "cannot export the last spans"));
    redis.disconnect();
    execHelper?.stop();
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop("SIGTERM"));
  process.on("SIGINT", () => void stop("SIGINT"));
}
