"""One-line breaks of the README's promises, and the fast tests that must catch each one.

``original`` must occur exactly once in ``file`` (a few lines of context are fine where the
line itself repeats); ``replacement`` is what the break puts there. ``tests`` are pytest node
ids relative to the repository root: the fewest and fastest tests that fail when the promise
breaks (tests/mutations/run.py runs only those). When the code moves, update the text here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Break:
    name: str
    promise: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


FINETUNE = "src/visiontune/training/finetune.py"
CALLBACKS = "src/visiontune/training/callbacks.py"
PIPELINE = "src/visiontune/pipeline_run.py"
DEEPSPEED = "src/visiontune/training/deepspeed.py"
SERVING = "src/visiontune/serving/mlflow_model.py"
CLASSIFIER = "src/visiontune/inference/classifier.py"
PAYLOAD = "src/visiontune/serving/payload.py"
IMAGES = "src/visiontune/data/images.py"
FILES = "src/visiontune/data/files.py"
OUTPUTS = "src/visiontune/outputs.py"
PREDICTION = "src/visiontune/prediction.py"
ONNX = "src/visiontune/onnx_export.py"
SOURCES = "src/visiontune/data/sources.py"
PREPARE = "src/visiontune/data/prepare.py"
CHECK = "src/visiontune/data/check.py"
METRICS = "src/visiontune/metrics.py"
COMPONENTS = "src/visiontune/components.py"
TRANSFORMS = "src/visiontune/data/transforms.py"
ARGUMENTS = "src/visiontune/training/arguments.py"
COLUMNAR = "src/visiontune/data/columnar.py"
STORAGE = "src/visiontune/data/storage.py"
CHECKED = "src/visiontune/data/checked.py"
TRACKING = "src/visiontune/training/tracking.py"
CONSOLE = "src/visiontune/console.py"

T_REUSED_CHECK = ("tests/data/test_prepare.py::test_an_earlier_check_is_reused_only_when_asked_and_"
                  "only_for_unchanged_images")
T_TRACKING_ONE_LINE = "tests/training/test_finetune.py::test_a_tracking_plugin_s_own_log_lines_give_way_to_one_warning"
T_SILENCED_THREADS = ("tests/test_console.py::test_silenced_blocks_overlapping_in_threads_keep_the_loggers_"
                      "silent_until_the_last_leaves")
T_FORMAT_BAD_ROWS = "tests/data/test_formats.py::test_bad_rows_in_parquet_are_reported_with_their_row"
T_RESUME = "tests/training/test_finetune.py::test_resume_equals_an_uninterrupted_run"
T_RESUME_MID = "tests/training/test_finetune.py::test_resume_in_the_middle_of_an_epoch_equals_an_uninterrupted_run[plain]"
T_RESUME_CHOICE = "tests/promises/test_resume.py::test_resume_takes_the_newest_complete_checkpoint_and_removes_the_others"
T_RESUME_LOG = "tests/promises/test_resume.py::test_resume_keeps_the_metrics_lines_up_to_the_checkpoint_once"
T_FINETUNE_WAIT = "tests/promises/test_completion.py::test_finetune_waits_for_rank_zero_after_its_last_output"
T_PIPELINE_WAIT = "tests/promises/test_completion.py::test_pipeline_waits_for_rank_zero_after_the_evaluation_report"
T_AZURE_PIPELINE = "tests/training/test_distributed.py::test_azure_ml_environment_without_torchrun_runs_the_pipeline"
T_NOTES = "tests/promises/test_completion.py::test_the_notes_printed_at_start_are_the_notes_saved"
T_DS_MERGE = "tests/training/test_training_plan.py::test_deepspeed_config_values_that_differ_from_the_inputs_are_replaced_with_a_note"
T_DS_PLAN = "tests/training/test_deepspeed.py::test_the_trainer_accepts_the_merged_config_without_mismatches"
T_IMAGE_BYTES = "tests/promises/test_limits.py::test_max_image_bytes_below_at_and_over_the_limit_in_every_form"
T_IMAGES = "tests/promises/test_limits.py::test_max_images_per_request_below_at_and_over_the_limit"
T_DATA_BYTES = "tests/promises/test_limits.py::test_data_byte_limit_below_at_and_over"
T_PIXELS_IMAGE = "tests/serving/test_serving.py::test_pixels_per_image_below_at_and_over_the_limit"
T_PIXELS_REQUEST = "tests/serving/test_serving.py::test_pixels_per_request_below_at_and_over_the_limit"
T_STAGED_FIRST = "tests/promises/test_atomic.py::test_an_interrupted_first_write_leaves_nothing"
T_STAGED_REWRITE = "tests/promises/test_atomic.py::test_an_interrupted_rewrite_keeps_the_old_output_and_a_later_one_replaces_it"
T_PREDICTIONS = "tests/promises/test_atomic.py::test_an_interrupted_predictions_file_keeps_the_old_one_or_none"
T_ONNX_ATOMIC = "tests/promises/test_atomic.py::test_an_interrupted_onnx_export_leaves_the_old_export_or_none"
T_MLFLOW_ATOMIC = "tests/promises/test_atomic.py::test_an_interrupted_mlflow_model_keeps_the_old_one_or_none"
T_KILLED = "tests/test_outputs.py::test_a_write_killed_midway_leaves_no_complete_marker_and_its_staging_is_cleared"
T_INTERRUPTED = "tests/test_outputs.py::test_an_interrupted_write_leaves_the_old_output"
T_JSONL_LINES = "tests/data/test_sources.py::test_jsonl_row_problems_have_lines"
T_CSV_LINES = "tests/data/test_sources.py::test_csv_row_problems_have_lines"
T_BAD_ROWS = "tests/data/test_prepare.py::test_bad_rows_stop_by_default_with_file_and_line"
T_CHECK_REPORT = "tests/data/test_prepare.py::test_check_data_report"
T_TEST_DATA_BAD_ROWS = "tests/data/test_prepare.py::test_test_data_bad_rows_follow_the_training_rules"
T_THRESHOLD_METRICS = "tests/promises/test_thresholds.py::test_metrics_count_a_probability_at_the_threshold_as_predicted"
T_THRESHOLD_TUNING = "tests/promises/test_thresholds.py::test_tuned_thresholds_are_the_best_under_the_rule_prediction_applies"
T_DEVICE_NORMALISE = "tests/training/test_finetune.py::test_normalising_uint8_batches_on_the_device_trains_the_same_model"
T_CACHE_ONCE = "tests/training/test_distributed.py::test_the_node_decodes_the_images_into_the_cache_once"
T_THRESHOLD_RULE = "tests/promises/test_thresholds.py::test_every_backend_predicts_a_label_at_its_threshold"
T_METRICS_ML = "tests/test_metrics.py::test_multilabel_matches_sklearn"
T_METRICS_MC = "tests/test_metrics.py::test_multiclass_matches_sklearn_with_unseen_and_unpredicted_classes"
T_METRICS_RANDOM = "tests/test_metrics.py::test_random_cases_match_sklearn_everywhere[0]"
T_SPECS = "tests/test_components.py::test_specs_match_the_input_table"
T_COMMAND_PARSES = "tests/test_components.py::test_the_command_parses_with_the_cli[finetune-False]"
T_PIPELINE_SPEC = "tests/test_components.py::test_pipeline_has_azure_s_interface"
T_SAVED_PROCESSOR = "tests/promises/test_consumers.py::test_saved_processor_computes_the_evaluation_transform[vit]"
T_TRUNCATED = "tests/data/test_fast_paths.py::test_verification_still_finds_truncated_jpegs"
T_SAS_NOWHERE = ("tests/data/test_stores.py::test_finetune_evaluate_and_predict_from_a_sas_folder_"
                 "leave_the_sas_nowhere")
T_DAMAGED = "tests/data/test_fast_paths.py::test_verification_agrees_with_full_decoding_on_damaged_files"

RESUME = "resume continues from the newest complete checkpoint, equal to an uninterrupted run"
COMPLETION = "every process returns only after rank 0 has written the outputs"
DS_NOTES = "DeepSpeed overrides (and every decision taken for the user) are printed and saved as notes"
LIMITS = "serving limits: bytes, images and pixels per image and per request"
ATOMIC = "outputs are written whole or not at all (old state or nothing)"
BAD_ROWS = "bad rows are never lost silently; reported with file and line"
FORMATS = "Parquet and Hugging Face datasets read as datasets reads them, class names included"
SECRETS = "no credential in a log line or an output file (URLs lose their query string)"
THRESHOLDS = "multi-label: a label is predicted at or above its threshold"
METRICS_P = "metrics have scikit-learn's definitions"
AZURE = "Azure component specs: Azure's interface, optional inputs, not deterministic"
PREPROCESSING = "one preprocessing for validation, evaluation and serving (the saved processor too)"
GPU_LOADER = "a GPU run's loader: uint8 batches normalised on the device, the image cache filled once per node"
DATA_CHECK = "the data check decodes every image: damaged files are bad rows"
TRACKING_P = "tracking that cannot be reached never fails a run: one warning line, training goes on"

BREAKS: list[Break] = [
    # --- resume ---------------------------------------------------------------------------
    Break("resume-restarts-from-step-0", RESUME, FINETUNE,
          "trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)",
          "trainer.train(resume_from_checkpoint=None)", (T_RESUME,)),
    Break("resume-keeps-incomplete-checkpoints", RESUME, CALLBACKS,
          "        if not is_complete(folder):\n            shutil.rmtree",
          "        if False:\n            shutil.rmtree", (T_RESUME_CHOICE,)),
    Break("resume-marker-not-needed", RESUME, CALLBACKS,
          '        marker = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))',
          "        marker = {}", (T_RESUME_CHOICE,)),
    Break("resume-marker-files-not-checked", RESUME, CALLBACKS,
          '    return all((folder / name).exists() for name in marker.get("files", []))',
          "    return True", (T_RESUME_CHOICE,)),
    Break("resume-oldest-complete-checkpoint", RESUME, CALLBACKS,
          "    for _, folder in reversed(list_checkpoints(output_dir)):",
          "    for _, folder in list_checkpoints(output_dir):", (T_RESUME_CHOICE,)),
    Break("resume-metrics-log-not-trimmed", RESUME, FINETUNE,
          "if trim_metrics_log(out / METRICS_LOG, step):",
          "if False:", (T_RESUME_LOG,)),
    Break("resume-torn-metrics-line-kept", RESUME, CALLBACKS,
          "            step = last_step + 1  # a torn line from a killed run",
          "            step = 0", (T_RESUME_LOG,)),
    # --- distributed completion -----------------------------------------------------------
    Break("pipeline-last-wait-removed", COMPLETION, PIPELINE,
          '    distributed.wait_for_main_process("evaluating")',
          "    pass", (T_PIPELINE_WAIT,)),
    Break("finetune-last-wait-removed", COMPLETION, FINETUNE,
          '    distributed.wait_for_main_process("writing the outputs")',
          "    pass", (T_FINETUNE_WAIT,)),
    # --- DeepSpeed notes (T_DS_PLAN needs the deepspeed package) ---------------------------
    Break("deepspeed-merge-notes-dropped", DS_NOTES, DEEPSPEED,
          "    return merged, notes + merge_notes",
          "    return merged, notes", (T_DS_PLAN,)),
    Break("deepspeed-notes-left-out-of-the-plan", DS_NOTES, ARGUMENTS,
          "        notes.extend(ds_notes)",
          "        pass", (T_DS_PLAN,)),
    Break("deepspeed-replacement-note-lost", DS_NOTES, DEEPSPEED,
          '            notes.append(f"deepspeed_config: {key} {_shown(old)} replaced by {_shown(new)} ({why})")',
          "            pass", (T_DS_MERGE,)),
    Break("notes-not-printed", DS_NOTES, FINETUNE,
          '        lines.append(f"  note: {note}")',
          "        pass", (T_NOTES,)),
    Break("notes-not-saved", DS_NOTES, FINETUNE,
          '{"values": values, "sources": sources, "notes": notes}',
          '{"values": values, "sources": sources, "notes": []}', (T_NOTES,)),
    # --- serving and data limits ---------------------------------------------------------
    Break("url-download-unbounded", LIMITS, PAYLOAD,
          "return download(url, max_bytes, timeout=URL_TIMEOUT_S, deadline_s=URL_DEADLINE_S)",
          "return download(url, 2**62, timeout=URL_TIMEOUT_S, deadline_s=URL_DEADLINE_S)",
          (T_IMAGE_BYTES,)),
    Break("serving-max-image-bytes-not-passed", LIMITS, SERVING,
          "allow_urls=config.allow_urls, max_bytes=config.max_image_bytes)",
          "allow_urls=config.allow_urls, max_bytes=2**62)", (T_IMAGE_BYTES,)),
    Break("max-images-per-request-off-by-one", LIMITS, SERVING,
          "if len(values) > config.max_images_per_request:",
          "if len(values) >= config.max_images_per_request:", (T_IMAGES,)),
    Break("base64-bytes-limit-off-by-one", LIMITS, PAYLOAD,
          "if len(compact) * 3 // 4 - padding > max_bytes:",
          "if len(compact) * 3 // 4 - padding >= max_bytes:", (T_IMAGE_BYTES,)),
    Break("base64-padding-not-counted", LIMITS, PAYLOAD,
          "if len(compact) * 3 // 4 - padding > max_bytes:",
          "if len(compact) * 3 // 4 > max_bytes:", (T_IMAGE_BYTES,)),
    Break("raw-bytes-limit-off-by-one", LIMITS, PAYLOAD,
          "        if len(data) > max_bytes:\n            raise _too_large(len(data), max_bytes)\n        return data",
          "        if len(data) >= max_bytes:\n            raise _too_large(len(data), max_bytes)\n        return data",
          (T_IMAGE_BYTES,)),
    Break("data-url-download-unbounded", LIMITS, IMAGES,
          "    data = fetch(url, limit)",
          "    data = fetch(url, 2**62)", (T_DATA_BYTES,)),
    Break("data-file-limit-off-by-one", LIMITS, IMAGES,
          "        if info.st_size > limit:",
          "        if info.st_size >= limit:", (T_DATA_BYTES,)),
    Break("declared-download-length-off-by-one", LIMITS, IMAGES,
          "if declared and declared.isdigit() and int(declared) > limit:",
          "if declared and declared.isdigit() and int(declared) >= limit:", (T_DATA_BYTES,)),
    Break("streamed-download-limit-off-by-one", LIMITS, FILES,
          "    if total > limit:\n        raise ImageTooLarge(what, None, limit)",
          "    if total >= limit:\n        raise ImageTooLarge(what, None, limit)", (T_DATA_BYTES,)),
    Break("pixels-per-image-off-by-one", LIMITS, PAYLOAD,
          "    if width * height > max_pixels:",
          "    if width * height >= max_pixels:", (T_PIXELS_IMAGE,)),
    Break("pixels-per-request-off-by-one", LIMITS, SERVING,
          "if pixels > config.max_pixels_per_request:",
          "if pixels >= config.max_pixels_per_request:", (T_PIXELS_REQUEST,)),
    # --- atomic outputs -------------------------------------------------------------------
    Break("staged-marker-moved-in-first", ATOMIC, OUTPUTS,
          "for name in sorted(new - {complete_marker}) + ([complete_marker] if complete_marker in new else []):",
          "for name in ([complete_marker] if complete_marker in new else []) + sorted(new - {complete_marker}):",
          (T_KILLED,)),
    Break("staged-old-marker-kept-while-replacing", ATOMIC, OUTPUTS,
          "        (folder / complete_marker).unlink(missing_ok=True)  # incomplete from here",
          "        pass", (T_KILLED,)),
    Break("staged-failed-first-write-leaves-a-folder", ATOMIC, OUTPUTS,
          "                    folder.rmdir()  # only if empty",
          "                    pass", (T_STAGED_FIRST,)),
    Break("staged-old-entries-kept", ATOMIC, OUTPUTS,
          "            if old.name not in new:\n                _remove(old)",
          "            if False:\n                _remove(old)", (T_STAGED_REWRITE,)),
    Break("predictions-written-in-place", ATOMIC, PREDICTION,
          '    tmp = output.with_name(f".{output.name}.tmp")',
          "    tmp = output", (T_PREDICTIONS,)),
    Break("onnx-old-metadata-kept-during-export", ATOMIC, ONNX,
          "    (output_dir / EXPORT_METADATA_FILE).unlink(missing_ok=True)  # the folder is incomplete until the end",
          "    pass", (T_ONNX_ATOMIC,)),
    Break("finetune-earlier-record-kept-during-save", ATOMIC, FINETUNE,
          "        ModelFolder(out).invalidate()  # an earlier run's record until this run's is written",
          "        pass",
          ("tests/promises/test_atomic.py::test_an_interrupted_fine_tune_save_leaves_no_record_of_the_earlier_model",)),
    # --- bad rows -------------------------------------------------------------------------
    Break("malformed-json-row-dropped", BAD_ROWS, SOURCES,
          "            problems.append(Problem(where, row))",
          "            pass", (T_JSONL_LINES,)),
    Break("bad-label-row-dropped", BAD_ROWS, SOURCES,
          "        (problems if isinstance(result, Problem) else records).append(result)",
          "        records.append(result) if not isinstance(result, Problem) else None",
          (T_JSONL_LINES,)),
    Break("sas-token-kept", SECRETS, STORAGE,
          "    if not parsed.scheme or (not parsed.query and not parsed.password):",
          "    if True:",
          ("tests/data/test_stores.py::test_a_sas_token_never_reaches_a_message_or_an_output",)),
    Break("blob-folder-sas-on-disk", SECRETS, STORAGE,
          "    origin = _in_store(uri, root)  # never the SAS: it stays in memory (_FOLDER_SAS)",
          "    origin = _in_store(uri, root, sas=True)", (T_SAS_NOWHERE,)),
    Break("blob-folder-sas-in-finetune-args", SECRETS, FINETUNE,
          "    values, sources, notes = shown_inputs(cfg), setup.sources, setup.plan.notes",
          "    values, sources, notes = cfg.as_dict(), setup.sources, setup.plan.notes",
          (T_SAS_NOWHERE,)),
    Break("classlabel-names-lost", FORMATS, COLUMNAR,
          "            return names[value]", "            return value",
          ("tests/data/test_formats.py::test_a_saved_dataset_reads_as_datasets_reads_it",)),
    Break("empty-parquet-image-row-dropped", BAD_ROWS, COLUMNAR,
          '                yield where, f"column {image!r} holds no image (null or empty)"',
          "                pass", (T_FORMAT_BAD_ROWS,)),
    Break("bad-image-row-dropped", BAD_ROWS, PREPARE,
          "            bad.append(Problem(record.where, result))",
          "            pass", (T_BAD_ROWS,)),
    Break("json-line-number-off-by-one", BAD_ROWS, SOURCES,
          "for number, line in enumerate(lines, start=1):",
          "for number, line in enumerate(lines, start=0):", (T_JSONL_LINES,)),
    Break("csv-line-number-off-by-one", BAD_ROWS, SOURCES,
          "        start = reader.line_num + 1",
          "        start = reader.line_num", (T_CSV_LINES,)),
    Break("data-check-drops-bad-images", BAD_ROWS, CHECK,
          "    problems = in_file_order(problems + bad_images)",
          "    problems = in_file_order(problems)", (T_CHECK_REPORT,)),
    Break("test-data-drops-bad-images", BAD_ROWS, PREPARE,
          "    bad = in_file_order(problems + bad_images)",
          "    bad = in_file_order(problems)", (T_TEST_DATA_BAD_ROWS,)),
    # --- thresholds -----------------------------------------------------------------------
    Break("metrics-threshold-strict", THRESHOLDS, METRICS,
          "y_pred = (probs >= _thresholds(threshold, num_classes)).astype(np.int64)",
          "y_pred = (probs > _thresholds(threshold, num_classes)).astype(np.int64)",
          (T_THRESHOLD_METRICS,)),
    Break("prediction-threshold-strict", THRESHOLDS, CLASSIFIER,
          "return [c for c, x, t in zip(self.classes, probs, thresholds) if x >= t]",
          "return [c for c, x, t in zip(self.classes, probs, thresholds) if x > t]",
          (T_THRESHOLD_RULE,)),
    Break("tuning-threshold-strict", THRESHOLDS, METRICS,
          "scores = np.array([score((probs >= t).astype(np.int64)) for t in grid], dtype=np.float64)",
          "scores = np.array([score((probs > t).astype(np.int64)) for t in grid], dtype=np.float64)",
          (T_THRESHOLD_TUNING,)),
    # --- metrics --------------------------------------------------------------------------
    Break("f1-without-the-factor-2", METRICS_P, METRICS,
          '"f1": _ratio(2 * tp, predicted + support)',
          '"f1": _ratio(tp, predicted + support)', (T_METRICS_MC,)),
    Break("macro-over-present-classes-only", METRICS_P, METRICS,
          '"f1_score_macro": float(np.mean(f1)),',
          '"f1_score_macro": float(np.mean(f1[support > 0])),', (T_METRICS_MC,)),
    Break("multilabel-accuracy-per-label", METRICS_P, METRICS,
          "return float(np.mean(equal if equal.ndim == 1 else equal.all(axis=1)))",
          "return float(np.mean(equal))", (T_METRICS_ML,)),
    Break("iou-weighted-unweighted", METRICS_P, METRICS,
          "    return float(_ratio([(scores[\"iou\"] * support).sum()], [support.sum()])[0])",
          "    return float(np.mean(scores[\"iou\"]))", (T_METRICS_ML,)),
    # --- Azure components -----------------------------------------------------------------
    Break("command-component-deterministic", AZURE, COMPONENTS,
          '        "is_deterministic": False,\n        "code": CODE,',
          '        "is_deterministic": True,\n        "code": CODE,', (T_SPECS,)),
    Break("pipeline-component-deterministic", AZURE, COMPONENTS,
          '        "is_deterministic": False,\n        "inputs":',
          '        "is_deterministic": True,\n        "inputs":', (T_PIPELINE_SPEC,)),
    Break("optional-flag-lost", AZURE, COMPONENTS,
          '        out["optional"] = True',
          "        pass", (T_SPECS,)),
    Break("optional-input-always-on-the-command-line", AZURE, COMPONENTS,
          '    return f"$[[{arg}]]" if where == "inputs" and not spec.required else arg',
          "    return arg", (T_COMMAND_PARSES,)),
    # --- data check -----------------------------------------------------------------------
    Break("earlier-check-reused-unasked", DATA_CHECK, PREPARE,
          '        known = checked.recall(stamps) if settings.flag("VISIONTUNE_REUSE_IMAGE_CHECK") else {}',
          "        known = checked.recall(stamps)", (T_REUSED_CHECK,)),
    Break("changed-image-check-reused", DATA_CHECK, CHECKED,
          "                    if (size, mtime_ns) == (now_size, now_mtime):",
          "                    if size == now_size:", (T_REUSED_CHECK,)),
    Break("damaged-jpeg-accepted", DATA_CHECK, IMAGES,
          "        image.load()\n    except OSError as exc:",
          "        pass\n    except OSError as exc:", (T_TRUNCATED,)),
    Break("data-check-passes-bad-rows", DATA_CHECK, CHECK,
          "    elif problems and not skip_bad_rows:",
          "    elif False:", (T_CHECK_REPORT,)),
    # --- tracking -------------------------------------------------------------------------
    Break("tracking-plugin-logs-shown", TRACKING_P, TRACKING,
          "                with silenced(AZURE_LIBRARIES):",
          "                with silenced(()):", (T_TRACKING_ONE_LINE,)),
    Break("tracking-failure-not-caught", TRACKING_P, TRACKING,
          "            except Exception as exc:  # noqa: BLE001 - any tracking failure, by design",
          "            except KeyboardInterrupt as exc:", (T_TRACKING_ONE_LINE,)),
    Break("silenced-ends-with-the-first-block", TRACKING_P, CONSOLE,
          "                if depth > 1:",
          "                if False:", (T_SILENCED_THREADS,)),
    # --- one preprocessing --------------------------------------------------------------
    Break("saved-processor-bicubic", PREPROCESSING, FINETUNE,
          '"resample": PIL_CODES[pre.interpolation]',
          '"resample": PIL_CODES["bicubic"]', (T_SAVED_PROCESSOR,)),
    # --- a GPU run's loader (run on the CPU) ------------------------------------------------
    Break("device-batches-not-normalised", GPU_LOADER, "src/visiontune/training/trainer.py",
          '            inputs["pixel_values"] = self.normalise(inputs["pixel_values"])',
          '            inputs["pixel_values"] = inputs["pixel_values"].float()', (T_DEVICE_NORMALISE,)),
    Break("every-process-fills-the-cache", GPU_LOADER, FINETUNE,
          '    with args.main_process_first(local=True, desc="filling the decoded-image cache"):',
          "    if True:", (T_CACHE_ONCE,)),
]
