// End-to-end test of the generated Kotlin bindings on the JVM, against the real Rust library
// (loaded through JNA): the same scenario as test_python.py. Prints
// "bindings-kotlin: N passed, N failed" and exits non-zero on failure.
//
// usage: MainKt CASE_DIR MODEL_PATH [LIFECYCLE_DIR REPO_URL]
//   LIFECYCLE_DIR: scripts/e2e_deploy.py --prepare's output; REPO_URL serves its steps/

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.awaitAll
import kotlinx.coroutines.runBlocking
import uniffi.tern_ffi.*

var passed = 0
var failed = 0

fun check(name: String, body: () -> Unit) {
    try {
        body()
        passed++
        println("ok   $name")
    } catch (e: Throwable) {
        failed++
        println("FAIL $name: $e")
    }
}

fun expect(condition: Boolean, message: () -> String) {
    if (!condition) throw AssertionError(message())
}

inline fun <reified E : Throwable> assertThrows(body: () -> Unit): E {
    try {
        body()
    } catch (e: Throwable) {
        if (e is E) return e
        throw AssertionError("expected ${E::class.simpleName}, got $e")
    }
    throw AssertionError("expected ${E::class.simpleName}, nothing thrown")
}

fun floats(bytes: ByteArray): FloatArray {
    val buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
    return FloatArray(buf.remaining()).also { buf.get(it) }
}

fun main(args: Array<String>) {
    val case = File(args[0])
    val modelPath = args[1]
    val (n, width, classes) = File(case, "shape.txt").readText().trim().split(" ").map { it.toInt() }
    val input = File(case, "input.bin").readBytes()
    val expected = floats(File(case, "expected.bin").readBytes())
    val cpu = SessionConfig(backend = Backend.CPU, threads = 1u, nanPolicy = NanPolicy.REJECT, telemetry = false)
    fun bytesInput() = TensorData("bytes", DType.I32, listOf(n.toULong(), width.toULong()), input)

    check("real model matches onnxruntime") {
        TernModel.fromPath(modelPath).use { model ->
            val info = model.info()
            expect(info.inputs.map { it.name } == listOf("bytes")) { "inputs ${info.inputs}" }
            TernSession(model, cpu).use { session ->
                expect(session.backend().backend == Backend.CPU) { "${session.backend()}" }
                val out = session.run(listOf(bytesInput()))
                expect(out[0].shape == listOf(n.toULong(), classes.toULong())) { "shape ${out[0].shape}" }
                val got = floats(out[0].data)
                val worst = got.indices.maxOf { kotlin.math.abs(got[it] - expected[it]) }
                expect(worst < 1e-4f) { "max abs diff $worst" }
            }
        }
    }

    check("suspend runAsync") {
        TernModel.fromPath(modelPath).use { model ->
            TernSession(model, cpu).use { session ->
                val out = runBlocking { session.runAsync(listOf(bytesInput())) }
                val got = floats(out[0].data)
                expect(got.indices.all { kotlin.math.abs(got[it] - expected[it]) < 1e-4f }) { "async outputs differ" }
            }
        }
    }

    check("errors are exceptions of a sealed hierarchy") {
        TernModel.fromPath(modelPath).use { model ->
            TernSession(model, cpu).use { session ->
                val shape = assertThrows<TernException.InvalidInput> {
                    session.run(listOf(tensorI32("bytes", listOf(1uL, 7uL), List(7) { 0 })))
                }
                expect(shape.kind == ErrorKind.SHAPE_MISMATCH) { "${shape.kind}" }
                val dtype = assertThrows<TernException.InvalidInput> {
                    session.run(listOf(tensorF32("bytes", listOf(1uL, 2048uL), List(2048) { 0f })))
                }
                expect(dtype.kind == ErrorKind.DTYPE_MISMATCH) { "${dtype.kind}" }
            }
        }
        assertThrows<TernException.InvalidModel> { TernModel.fromBytes("not a model".toByteArray()) }
        assertThrows<TernException.Io> { TernModel.fromPath("/nonexistent/model.onnx") }
        val err: TernException = assertThrows<TernException.InvalidOption> {
            TernSession(TernModel.fromPath(modelPath), cpu.copy(backend = Backend.GPU))
        }
        expect(when (err) { is TernException.InvalidOption -> true; else -> false }) { "exhaustive when" }
    }

    check("telemetry uploads through a Kotlin uploader") {
        val dir = kotlin.io.path.createTempDirectory("tern-kotlin-telemetry").toFile()
        val telemetry = initTelemetry(dir.path, TelemetryConfig(healthSampleRate = 1.0, serviceName = "kotlin-test"))
        val batches = mutableListOf<UploadBatch>()
        val uploader = object : TelemetryUploader {
            override fun upload(batch: UploadBatch): UploadResult {
                batches.add(batch)
                return UploadResult.Accepted
            }
        }
        TernModel.fromPath(modelPath).use { model ->
            TernSession(model, cpu.copy(telemetry = true)).use { session ->
                repeat(3) { session.run(listOf(bytesInput())) }
            }
        }
        telemetry.event("app.opened", mapOf("screen" to "main"))
        telemetry.flush()
        val report = telemetry.uploadPending(uploader)
        expect(report.batchesAccepted >= 1uL) { "report $report" }
        val traces = batches.flatMap { it.payloads }.first { it.signal == Signal.TRACES }.json
        expect(Regex("\"name\":\"tern.run\"").findAll(traces).count() == 3) { "spans in $traces" }
        expect(batches.flatMap { it.payloads }.any { it.signal == Signal.LOGS && it.json.contains("app.opened") }) { "event" }
        expect(telemetry.stats().pendingBatches == 0uL) { "stats ${telemetry.stats()}" }
        dir.deleteRecursively()
    }

    check("a batcher coalesces coroutines' requests") {
        TernModel.fromPath(modelPath).use { model ->
            TernSession(model, cpu).use { session ->
                val config = BatchConfig(maxBatch = 8u, maxWaitMs = 50.0, queueCapacity = 64u, eager = false)
                TernBatcher(session, config).use { batcher ->
                    val row = width * 4
                    val outs = runBlocking {
                        (0 until 8).map { i ->
                            async(Dispatchers.Default) {
                                val r = i % n
                                val x = input.copyOfRange(r * row, (r + 1) * row)
                                r to floats(batcher.runAsync(listOf(TensorData("bytes", DType.I32, listOf(1uL, width.toULong()), x)))[0].data)
                            }
                        }.awaitAll()
                    }
                    for ((r, got) in outs) {
                        val worst = got.indices.maxOf { kotlin.math.abs(got[it] - expected[r * classes + it]) }
                        expect(worst < 1e-4f) { "row $r differs by $worst" }
                    }
                    val stats = batcher.stats()
                    expect(stats.requests == 8uL && stats.runs < 8uL) { "stats $stats" }
                }
            }
        }
    }

    check("a stream carries silero VAD's state like onnxruntime") {
        val samples = floats(File(case, "stream_samples.bin").readBytes())
        val want = floats(File(case, "stream_probs.bin").readBytes())
        TernModel.fromPath(File(case, "vad_model.txt").readText().trim()).use { model ->
            TernSession(model, cpu).use { session ->
                val config = StreamConfig(
                    carries = listOf(StreamCarry("hn", "h"), StreamCarry("cn", "c")),
                    contexts = listOf(StreamContext("input", 64u)),
                )
                TernStream(session, config).use { stream ->
                    for (i in want.indices) {
                        val frame = samples.copyOfRange(i * 512, (i + 1) * 512).toList()
                        val out = stream.push(listOf(tensorF32("input", listOf(1uL, 512uL), frame)))
                        val p = floats(out.first { it.name == "speech_probs" }.data)[0]
                        expect(kotlin.math.abs(p - want[i]) < 1e-4f) { "frame $i: $p vs ${want[i]}" }
                    }
                    expect(stream.chunks() == want.size.toULong()) { "chunks ${stream.chunks()}" }
                }
                val bad = assertThrows<TernException.Flow> {
                    TernStream(session, StreamConfig(carries = listOf(StreamCarry("nope", "h"))))
                }
                expect(bad.kind == FlowErrorKind.BAD_STATE) { "${bad.kind}" }
                val notBatchable = assertThrows<TernException.Flow> { TernBatcher(session, BatchConfig()) }
                expect(notBatchable.kind == FlowErrorKind.NOT_BATCHABLE) { "${notBatchable.kind}" }
            }
        }
    }

    check("a job queue runs later, from a WorkManager-style runPending") {
        val dir = kotlin.io.path.createTempDirectory("tern-kotlin-jobs").toFile()
        val config = JobConfig(capacity = 8u, maxAttempts = 3u, backoffSeconds = 1.0)
        val row = width * 4
        val ids = TernJobQueue.open(dir.path, config).use { q ->
            (0 until n).map { r ->
                val x = input.copyOfRange(r * row, (r + 1) * row)
                q.submit("magika", listOf(TensorData("bytes", DType.I32, listOf(1uL, width.toULong()), x)), Priority.NORMAL, null)
            }
        }
        // A later process (the Worker's doWork) runs them within its budget.
        TernJobQueue.open(dir.path, config).use { q ->
            TernModel.fromPath(modelPath).use { model ->
                TernSession(model, cpu).use { session ->
                    q.register("magika", session)
                    val report = q.runPending(60_000uL)
                    expect(report.succeeded == n.toUInt() && report.pending == 0u) { "report $report" }
                }
            }
            for ((r, id) in ids.withIndex()) {
                val result = q.takeResult(id)
                expect(result is JobResult.Done) { "job $id: $result" }
                val got = floats((result as JobResult.Done).outputs[0].data)
                val worst = got.indices.maxOf { kotlin.math.abs(got[it] - expected[r * classes + it]) }
                expect(worst < 1e-4f) { "job $id differs by $worst" }
                expect(q.status(id) is JobState.Unknown) { "collected twice" }
            }
        }
        dir.deleteRecursively()
    }

    check("flows run Kotlin callbacks, with fallbacks, a cascade and typed failures") {
        val seen = mutableListOf<List<String>>()
        val pre = object : FlowCallback {
            override fun compute(inputs: List<TensorData>): List<TensorData> {
                seen.add(inputs.map { it.name })
                return inputs.map { it.copy(name = "bytes") }
            }
        }
        val boom = object : FlowCallback {
            override fun compute(inputs: List<TensorData>): List<TensorData> =
                throw IllegalStateException("boom from Kotlin")
        }
        val rule = object : FlowCallback {
            override fun compute(inputs: List<TensorData>): List<TensorData> =
                listOf(tensorF32("label", listOf(1uL), listOf(-1.0f)))
        }
        val toml = """
            [sessions.magika]
            model = "$modelPath"
            [caches.c]
            max_bytes = 1000000
            [steps.pre]
            callback = "pre"
            [steps.model]
            session = "magika"
            cache = "c"
            [steps.guarded]
            callback = "boom"
            fallbacks = [{ rule = "rule" }]
            [steps.boom]
            callback = "boom"
            [flows.pipe]
            pipeline = ["pre", "model"]
            [flows.guarded]
            pipeline = ["guarded"]
            [flows.bare]
            pipeline = ["boom"]
            [flows.sure]
            cascade = [
              { step = "model", exit = { output = "target_label", confidence = "max_probability", threshold = 0.0 } },
              { step = "boom" },
            ]
        """.trimIndent()
        val callbacks = mapOf("pre" to pre, "boom" to boom, "rule" to rule)
        TernFlows.fromToml(toml, ".", cpu, callbacks).use { flows ->
            expect(flows.names() == listOf("bare", "guarded", "pipe", "sure")) { "names ${flows.names()}" }
            val raw = TensorData("raw", DType.I32, listOf(n.toULong(), width.toULong()), input)
            for (attempt in 0..1) {
                val r = runBlocking { flows.runAsync("pipe", listOf(raw)) }
                val got = floats(r.outputs[0].data)
                val worst = got.indices.maxOf { kotlin.math.abs(got[it] - expected[it]) }
                expect(worst < 1e-4f) { "pipeline differs by $worst" }
                val want = if (attempt == 0) Source.MODEL else Source.CACHE
                expect(r.answered.map { it.step to it.source } == listOf("pre" to Source.MODEL, "model" to want)) { "answered ${r.answered}" }
            }
            expect(seen == listOf(listOf("raw"), listOf("raw"))) { "callback saw $seen" }
            val g = flows.run("guarded", listOf(raw))
            expect(g.answered.single().source == Source.RULE && floats(g.outputs[0].data).toList() == listOf(-1.0f)) { "guarded $g" }
            val failure = g.failure
            expect(failure is StepFailure.Error && failure.kind == FlowErrorKind.CALLBACK) { "failure $failure" }
            val err = assertThrows<TernException.Flow> { flows.run("bare", listOf(raw)) }
            expect(err.kind == FlowErrorKind.CALLBACK && err.message!!.contains("boom from Kotlin")) { "error $err" }
            val sure = flows.run("sure", listOf(bytesInput()))
            expect(sure.stage == 0u && sure.confidences.size == 1) { "cascade $sure" }
            val counters = flows.stepStats()
            expect(counters["guarded"]!!.fallbacks == 1uL && counters["boom"]!!.errors == 1uL) { "counters $counters" }
            expect(flows.cacheStats()["c"]!!.hits == 2uL) { "cache ${flows.cacheStats()}" }
            expect(flows.breakerStates()["model"] == BreakerState.CLOSED) { "breakers ${flows.breakerStates()}" }
        }
        val cycle = assertThrows<TernException.Flow> {
            TernFlows.fromToml("[steps.a]\nflow = \"f\"\n[flows.f]\npipeline = [\"a\"]\n", ".", cpu, mapOf())
        }
        expect(cycle.kind == FlowErrorKind.BAD_FLOW && cycle.message!!.contains("cycle")) { "cycle $cycle" }
    }

    if (args.size >= 4) check("the model lifecycle over HTTP: pull, golden check, shadow, promote, a bad update rolled back") {
        val dir = File(args[2])
        val base = args[3]
        // The app's network: java.net over the repository as it stands at `step`.
        class HttpFetcher(var step: Int) : ModelFetcher {
            override fun fetch(path: String, offset: ULong, maxBytes: ULong): FetchResult {
                val connection = java.net.URL("$base/$step/$path").openConnection() as java.net.HttpURLConnection
                connection.setRequestProperty("Range", "bytes=$offset-${offset + maxBytes - 1uL}")
                return when (val code = connection.responseCode) {
                    404 -> FetchResult.NotFound
                    200, 206 -> connection.inputStream.use { s ->
                        if (code == 200) s.skipNBytes(offset.toLong()) // the server ignored Range
                        FetchResult.Data(s.readNBytes(maxBytes.toInt()))
                    }
                    else -> FetchResult.Failed("HTTP $code")
                }
            }
        }
        val fetcher = HttpFetcher(1)
        val root = File(dir, "root.json").readBytes()
        val keys = listOf(File(dir, "release.key.pub").readText())
        val storeDir = kotlin.io.path.createTempDirectory("tern-store").toFile()
        TernModelStore.open(storeDir.path, keys, 1u, StoreConfig(session = cpu)).use { store ->
            val first = runBlocking { store.updateAsync("magika", root, fetcher) }
            expect(first is UpdateResult.Installed && first.result.version == 1uL && first.result.goldenSamples == 2uL) { "update 1: $first" }
            store.activate("magika", 1uL)
            val loaded = store.load("magika")
            val got = floats(loaded.session.run(listOf(bytesInput()))[0].data)
            expect(loaded.version == 1uL && got.indices.all { kotlin.math.abs(got[it] - expected[it]) < 1e-4f }) { "loaded ${loaded.version}" }
            loaded.session.close()
            expect(store.update("magika", root, fetcher) == UpdateResult.UpToDate(1uL)) { "nothing newer" }

            fetcher.step = 2
            val second = store.update("magika", root, fetcher)
            expect(second is UpdateResult.Installed && second.result.version == 2uL) { "update 2: $second" }
            store.stage("magika", 2uL)
            val heard = java.util.Collections.synchronizedList(mutableListOf<RolloutEvent>())
            val listener = object : RolloutListener {
                override fun onVerdict(event: RolloutEvent) { heard.add(event) }
            }
            // No policy from the app: version 2's signed one (shadow half, promote after 20).
            store.rollout("magika", null, "kotlin-device", listener).use { rollout ->
                val arms = (0 until 60).map { rollout.run(listOf(bytesInput()), null).also { rollout.waitForShadows() }.version }
                expect(rollout.verdict() is RolloutVerdict.Promote) { "verdict ${rollout.verdict()}" }
                expect(arms.take(40).all { it == 1uL } && arms.drop(40).all { it == 2uL }) { "served by $arms" }
            }
            expect(heard.single().verdict is RolloutVerdict.Promote) { "heard $heard" }
            val promoted = store.status().single()
            expect(promoted.active == 2uL && promoted.previous == 1uL) { "status $promoted" }

            fetcher.step = 3 // root and timestamp keys rotated; a bad version 3
            val third = runBlocking { store.updateAsync("magika", root, fetcher) }
            expect(third is UpdateResult.Installed && third.result.version == 3uL) { "update 3: $third" }
            store.stage("magika", 3uL)
            // The app's own policy. Latency is not judged here (the library's tests do, with
            // given durations).
            val strict = RolloutConfig(stage = RolloutStage.Shadow(1.0), minRequests = 10uL, maxP95Ratio = 1000.0, promoteAfter = 1000uL)
            store.rollout("magika", strict, "kotlin-device", listener).use { rollout ->
                repeat(30) { rollout.run(listOf(bytesInput()), null); rollout.waitForShadows() }
                val v = rollout.verdict()
                expect(v is RolloutVerdict.RollBack && v.reason is RollbackReason.Disagreement) { "verdict $v" }
                expect(rollout.health().compared == 10uL) { "health ${rollout.health()}" }
            }
            val after = store.status().single()
            expect(after.active == 2uL && after.quarantined.map { it.version } == listOf(3uL)) { "status $after" }
            val refused = assertThrows<TernException.Bundle> { store.activate("magika", 3uL) }
            expect(refused.kind == BundleErrorKind.QUARANTINED) { "activate 3: $refused" }
        }
        // A store trusting another key refuses the same bundles: a typed exception.
        val stranger = File(dir, "stranger.key.pub").readText()
        TernModelStore.open(kotlin.io.path.createTempDirectory("tern-store").toFile().path, listOf(stranger), 1u, StoreConfig(session = cpu)).use { store ->
            val e = assertThrows<TernException.Bundle> { store.update("magika", root, HttpFetcher(1)) }
            expect(e.kind == BundleErrorKind.SIGNATURE) { "stranger: $e" }
        }
    }

    println("bindings-kotlin: $passed passed, $failed failed")
    if (failed > 0) kotlin.system.exitProcess(1)
}
