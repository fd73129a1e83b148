"""A load generator for any OpenAI-compatible endpoint, behind `llmconsole bench serve`.

It follows SGLang's bench_serving so that figures compare across servers: the same arrival
process (Poisson at --request-rate, capped by --max-concurrency), the same datasets and the same
metric definitions (TTFT, TPOT, ITL, E2E latency, throughputs). It is a pure client, so it has
no engine flags and no tokenizer: token counts come from the server's final usage chunk.

config: what to run (ServeBenchConfig) and its checks; datasets: the workload (PromptSpec);
protocol: OpenAI request bodies and SSE chunks; client: the async HTTP client (run_benchmark);
stats: pure statistics; results: per-request outputs and the run's metrics.
"""
