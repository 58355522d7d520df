"""The Gradio app: baseline and accelerated side by side, with latency, quality and the frontier.

    $ accel app                       # http://127.0.0.1:7860, the reference models by default
    $ accel app --host 0.0.0.0 --port 8080

    >>> from app.gradio_app import build_demo
    >>> demo = build_demo()           # no model is loaded until a tab runs (or the preload thread)

Tabs: Image (``shapes-t2i``, ``tiny``, or a local diffusers folder / cached model id), Video
(``shapes-t2v``, ``tiny-wan``), Text (``dlm-tasks``, ``tiny-dlm``), One-step (teacher
vs a distilled student folder). One job runs at a time (the queue); steps, resolution, frames and
generation length are bounded; every error is shown in the tab's status line and the app keeps
serving. API names for ``gradio_client``: ``/run_image``, ``/run_video``, ``/run_text``,
``/run_one_step``.
"""

from __future__ import annotations

import threading

from .runner import (
    CACHE_METHODS,
    IMAGE_MODELS,
    LIMITS,
    TEXT_METHODS,
    TEXT_MODELS,
    VIDEO_METHODS,
    VIDEO_MODELS,
    AppError,
    Runner,
)

TITLE = "accel-suite: baseline vs accelerated"


def _table(metrics: dict):
    import pandas as pd

    return pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()])


def _points(runner: Runner, model: str, tab: str = "image"):
    import pandas as pd

    quality = "exact match (%)" if tab == "text" else "PSNR (dB)"
    rows = runner.frontier_points(model, tab)
    return pd.DataFrame(rows or [{"method": "none yet", "speedup": 1.0, quality: 0.0, "source": "live"}])


def _failure(exc: Exception) -> str:
    if isinstance(exc, AppError):
        return f"**Error:** {exc}"
    return f"**Error:** {type(exc).__name__}: {exc}".splitlines()[0][:500]


def build_demo(runner: Runner | None = None):
    import gradio as gr

    runner = runner or Runner()

    def settings_update(kind, model, method):
        try:
            choices = runner.settings(kind, model, method)
        except Exception:  # noqa: BLE001 - a settings list is a convenience, never an error
            choices = []
        return gr.update(choices=choices, value=choices[len(choices) // 2] if choices else "")

    def image_job(model, prompt, seed, steps, method, setting, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio reads it)
        try:
            out = runner.run_image(model, prompt, seed, steps, method, setting)
        except Exception as exc:  # noqa: BLE001 - shown in the UI; the app keeps serving
            return None, _table({}), _points(runner, model), _failure(exc)
        return ((out["baseline"], out["accelerated"]), _table(out["metrics"]), _points(runner, model),
                f"done: {out['metrics']['speedup']}x, PSNR {out['metrics']['PSNR (dB)']} dB")

    def video_job(model, prompt, seed, steps, frames, method, setting, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio reads it)
        try:
            out = runner.run_video(model, prompt, seed, steps, method, setting,
                                   frames=None if model == "tiny-wan" else frames)
        except Exception as exc:  # noqa: BLE001
            return None, None, _table({}), _points(runner, model, "video"), _failure(exc)
        return (out["baseline"], out["accelerated"], _table(out["metrics"]), _points(runner, model, "video"),
                f"done: {out['metrics']['speedup']}x")

    def text_job(model, prompt, method, setting, gen_length, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio reads it)
        # a generator: the baseline pane fills in (with its tokens/s) before the accelerated run starts
        import queue
        import threading

        updates: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                result["out"] = runner.run_text(model, prompt, method, setting, gen_length,
                                                on_baseline=lambda text, sec: updates.put((text, sec)))
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc
            updates.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (item := updates.get()) is not None:
            text, sec = item
            yield (text, "", _table({}), _points(runner, model, "text"),
                   f"baseline: {int(gen_length) / sec:.1f} tokens/s; running the accelerated method ...")
        if "error" in result:
            yield "", "", _table({}), _points(runner, model, "text"), _failure(result["error"])
            return
        out = result["out"]
        m = out["metrics"]
        yield (out["baseline"], out["accelerated"], _table(m), _points(runner, model, "text"),
               f"done: {m['baseline tokens/s']} vs {m['accelerated tokens/s']} tokens/s ({m['speedup']}x)")

    def one_step_job(teacher, student, prompt, seed, steps, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio reads it)
        try:
            out = runner.run_one_step(teacher, student, prompt, seed, steps)
        except Exception as exc:  # noqa: BLE001
            return None, _table({}), _failure(exc)
        return (out["baseline"], out["accelerated"]), _table(out["metrics"]), f"done: {out['metrics']['speedup']}x"

    lo, hi = LIMITS["steps"]
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nThe same seed runs plain and accelerated; the table compares them, the plot "
                    "shows every method measured on this model (benchmarks + your runs).")
        with gr.Tab("Image"):
            with gr.Row():
                i_model = gr.Dropdown(list(IMAGE_MODELS), value="shapes-t2i", allow_custom_value=True,
                                      label="model (reference, tiny, or a local diffusers folder)")
                i_method = gr.Dropdown(list(CACHE_METHODS), value="ECAD", label="method")
                i_setting = gr.Dropdown(runner_safe_settings(runner, "image", "shapes-t2i", "ECAD"),
                                        value=None, allow_custom_value=True, label="setting (or a file path)")
            i_prompt = gr.Textbox("a large red circle at the left and a small blue square at the top right",
                                  label="prompt")
            with gr.Row():
                i_seed = gr.Number(0, precision=0, label="seed")
                i_steps = gr.Slider(lo, hi, value=20, step=1, label="steps")
                i_run = gr.Button("Run", variant="primary", elem_id="run-image")
            i_status = gr.Markdown(elem_id="status-image")
            i_pair = gr.ImageSlider(label="baseline | accelerated", type="pil", format="png", elem_id="pair-image")
            with gr.Row():
                i_table = gr.Dataframe(label="metrics", elem_id="metrics-image")
                i_plot = gr.ScatterPlot(_points(runner, "shapes-t2i"), x="speedup", y="PSNR (dB)", color="method",
                                        label="speed vs quality", elem_id="plot-image")
            for trigger in (i_method.change, i_model.change):
                trigger(lambda m, me: settings_update("image", m, me), [i_model, i_method], i_setting)
            i_run.click(image_job, [i_model, i_prompt, i_seed, i_steps, i_method, i_setting],
                        [i_pair, i_table, i_plot, i_status], api_name="run_image")

        with gr.Tab("Video"):
            with gr.Row():
                v_model = gr.Dropdown(list(VIDEO_MODELS), value="shapes-t2v", allow_custom_value=True, label="model")
                v_method = gr.Dropdown(list(VIDEO_METHODS), value="StaticCache", label="method")
                v_setting = gr.Dropdown(["interval 2", "interval 3"], value="interval 2", allow_custom_value=True,
                                        label="setting (or a plan/profile path)")
            v_prompt = gr.Textbox("a red circle moving left", label="prompt")
            with gr.Row():
                v_seed = gr.Number(0, precision=0, label="seed")
                v_steps = gr.Slider(lo, hi, value=20, step=1, label="steps")
                v_frames = gr.Slider(*LIMITS["frames"], value=17, step=4, label="frames")
                v_run = gr.Button("Run", variant="primary", elem_id="run-video")
            v_status = gr.Markdown()
            with gr.Row():
                v_base = gr.Image(label="baseline", type="filepath")
                v_fast = gr.Image(label="accelerated", type="filepath")
            with gr.Row():
                v_table = gr.Dataframe(label="metrics")
                v_plot = gr.ScatterPlot(_points(runner, "shapes-t2v", "video"), x="speedup", y="PSNR (dB)",
                                        color="method", label="speed vs quality")
            v_method.change(lambda m, me: settings_update("video", m, me), [v_model, v_method], v_setting)
            v_run.click(video_job, [v_model, v_prompt, v_seed, v_steps, v_frames, v_method, v_setting],
                        [v_base, v_fast, v_table, v_plot, v_status], api_name="run_video")

        with gr.Tab("Text"):
            with gr.Row():
                t_model = gr.Dropdown(list(TEXT_MODELS), value="dlm-tasks", allow_custom_value=True, label="model")
                t_method = gr.Dropdown(list(TEXT_METHODS), value="dKV-Cache decode", label="method")
                t_setting = gr.Dropdown(["refresh 8", "refresh 4", "refresh 16"], value="refresh 8",
                                        allow_custom_value=True, label="setting")
            t_prompt = gr.Textbox("sort:qwertyuiop|", label="prompt")
            with gr.Row():
                t_len = gr.Slider(*LIMITS["gen_length"], value=64, step=32, label="generation length")
                t_run = gr.Button("Run", variant="primary", elem_id="run-text")
            t_status = gr.Markdown()
            with gr.Row():
                t_base = gr.Textbox(label="baseline")
                t_fast = gr.Textbox(label="accelerated")
            with gr.Row():
                t_table = gr.Dataframe(label="metrics")
                t_plot = gr.ScatterPlot(_points(runner, "dlm-tasks", "text"), x="speedup", y="exact match (%)",
                                        color="method", label="speed vs exact match (benchmark: batch 1)")
            t_method.change(lambda m, me: settings_update("text", m, me), [t_model, t_method], t_setting)
            t_run.click(text_job, [t_model, t_prompt, t_method, t_setting, t_len],
                        [t_base, t_fast, t_table, t_plot, t_status], api_name="run_text")

        with gr.Tab("One-step"):
            with gr.Row():
                o_teacher = gr.Dropdown(list(IMAGE_MODELS), value="shapes-t2i", allow_custom_value=True,
                                        label="teacher")
                o_student = gr.Textbox("runs/dmd/pipeline", label="distilled student (exported pipeline folder)")
            o_prompt = gr.Textbox("a small green triangle at the bottom left", label="prompt")
            with gr.Row():
                o_seed = gr.Number(0, precision=0, label="seed")
                o_steps = gr.Slider(lo, hi, value=20, step=1, label="teacher steps")
                o_run = gr.Button("Run", variant="primary", elem_id="run-one-step")
            o_status = gr.Markdown()
            o_pair = gr.ImageSlider(label="teacher | one-step student", type="pil", format="png")
            o_table = gr.Dataframe(label="metrics")
            o_run.click(one_step_job, [o_teacher, o_student, o_prompt, o_seed, o_steps], [o_pair, o_table, o_status],
                        api_name="run_one_step")
    demo.queue(default_concurrency_limit=1)
    return demo


def runner_safe_settings(runner: Runner, kind: str, model: str, method: str) -> list[str]:
    try:
        return runner.settings(kind, model, method)
    except Exception:  # noqa: BLE001
        return []


def preload(runner: Runner, model: str = "shapes-t2i") -> threading.Thread:
    """Load and warm the default model in the background, so the first click is fast."""

    def work():
        try:
            runner.warm("image", model)
        except Exception:  # noqa: BLE001 - the tab will show the error when used
            pass

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def launch(host: str = "127.0.0.1", port: int = 7860, preload_default: bool = True, **kwargs):
    runner = Runner()
    if preload_default:
        preload(runner)
    demo = build_demo(runner)
    return demo.launch(server_name=host, server_port=port, **kwargs)
