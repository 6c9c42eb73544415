"""The shipped gin configs parse, and a launcher writes only under --workdir."""

import glob
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from trackstar_jax import gin_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = sorted(
    os.path.relpath(p, gin_utils.GIN_CONFIG_DIR)
    for pattern in ('*.gin', 'scale/*.gin')
    for p in glob.glob(os.path.join(gin_utils.GIN_CONFIG_DIR, pattern))
)


@pytest.mark.parametrize('name', TOP_LEVEL)
def test_shipped_gin_config_parses(name):
    """Every binding names a configurable and a parameter that exist (run files may
    leave %gin.REQUIRED values to the user, so the config is not finalised here)."""
    gin.clear_config()
    gin.add_config_file_search_path(gin_utils.GIN_CONFIG_DIR)
    try:
        gin.parse_config_files_and_bindings([name], [], finalize_config=False)
    finally:
        gin.clear_config()


def _git_status():
    status = subprocess.run(
        ['git', 'status', '--porcelain', '--untracked-files=all'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # runs/ is git-ignored, so list it too: a default path there would hide from git.
    runs = sorted(
        os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, 'runs')) for f in files
    )
    return status, runs


def test_evaluate_launcher_writes_only_under_workdir(tmp_path):
    """The Quick Start command (shrunk by bindings) trains, evaluates and leaves the repo as
    it was: nothing under benchmarks/results/, runs/ or anywhere else but --workdir."""
    before = _git_status()
    workdir = tmp_path / 'run'
    bindings = [
        "include 'models/tiny.gin'",
        'trackstar_jax.TrainConfig.num_steps = 2',
        'trackstar_jax.TrainConfig.warmup_steps = 1',
        'trackstar_jax.TrainConfig.batch_size = 8',
        'trackstar_jax.TrainConfig.seq_len = 32',
        'trackstar_jax.TrainConfig.min_dim_size_to_factor = 16',
        'train_lm.max_documents = 200',
        'trackstar_jax.EvalConfig.num_queries = 4',
        'trackstar_jax.EvalConfig.num_distractors = 12',
        'trackstar_jax.EvalConfig.seq_len = 32',
        'trackstar_jax.EvalConfig.query_len = 32',
        'trackstar_jax.EvalConfig.k = 3',
        'trackstar_jax.EvalConfig.batch_size = 8',
        'trackstar_jax.EvalConfig.dimension_sweep = ()',
        'trackstar_jax.GradientSpec.block_dim = 16',
        'trackstar_jax.GradientSpec.num_layer_blocks = 2',
        """evaluate.methods = [@gold/trackstar_jax.Method(), @bm25/trackstar_jax.Method(),
            @exp2/trackstar_jax.Method(), @trackstar/trackstar_jax.Method()]""",
    ]
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    cmd = [sys.executable, os.path.join(ROOT, 'launch', 'evaluate.py'), f'--workdir={workdir}']
    cmd += [f'--gin_bindings={b}' for b in bindings]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert '| TrackStar' in out.stdout
    assert _git_status() == before
    for name in ('evaluate.gin', 'results.json', 'report.html', 'checkpoints', '.jax_cache'):
        assert os.path.exists(workdir / name), name
    # The config is written when the job starts and finalised (operative) when it ends.
    assert 'EvalConfig.num_queries = 4' in open(workdir / 'evaluate.gin').read()


def test_compile_launcher_reports_and_refuses(tmp_path):
    """launch/compile.py on the local devices: JSON for a step that fits, a non-zero exit
    that says what to change for one that does not."""
    import json

    tiny = [
        "include 'models/tiny.gin'",
        "trackstar_jax.DecoderConfig.dtype = 'float32'",
        'trackstar_jax.GradientSpec.block_dim = 16',
        'trackstar_jax.GradientSpec.num_layer_blocks = 2',
        "trackstar_jax.CompileConfig.mesh_axes = (('data', -1), ('model', 1))",
        'trackstar_jax.CompileConfig.seq_len = 32',
        'trackstar_jax.CompileConfig.batch_size = 4',
        'trackstar_jax.CompileConfig.num_queries = 8',
        'trackstar_jax.CompileConfig.chunk_rows = 64',
        'trackstar_jax.TrainConfig.seq_len = 32',
    ]
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}

    def run(extra, out):
        cmd = [
            sys.executable,
            os.path.join(ROOT, 'launch', 'compile.py'),
            '--gin_file=scale/paper_8b_v5p128.gin',
            '--topology=local',
            '--job=index,fit,score',
            f'--workdir={tmp_path}',
            f'--output={out}',
        ] + [f'--gin_bindings={b}' for b in tiny + extra]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    ok = run([], tmp_path / 'ok.json')
    assert ok.returncode == 0, ok.stderr[-3000:]
    record = json.load(open(tmp_path / 'ok.json'))
    assert record['command'].startswith('python ') and len(record['results']) == 3
    assert all(r['fits'] and r['topology'] == 'local:cpu' for r in record['results'])
    bad = run(['trackstar_jax.CompileConfig.hbm_bytes = 4096'], tmp_path / 'bad.json')
    assert bad.returncode == 1
    assert 'DOES NOT FIT' in bad.stderr and 'too much' in bad.stderr
    assert json.load(open(tmp_path / 'bad.json'))['results'][0]['fits'] is False


def test_readme_reliability_table_is_generated_from_the_tests():
    """The README's fault table is the tests' ``fault`` marks, not prose kept by hand."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'reliability_table.py'), '--check'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert readme.count('| `test_faults.py::') >= 30


def _benchmark(script: str):
    """The benchmark module benchmarks/<script> and its committed results JSON reader."""
    import importlib.util

    path = os.path.join(ROOT, 'benchmarks', script)
    name = f'{script[:-3]}_benchmark'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: a dataclass under `from __future__ import annotations`
    # looks its module up in sys.modules to read its field annotations.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _result(name: str) -> dict:
    import json

    with open(os.path.join(ROOT, 'benchmarks', 'results', name)) as f:
        return json.load(f)


def test_query_intervals_and_paired_differences_leave_out_undefined_queries():
    """Against a hand loop: a NaN query is dropped from a row's interval and from a paired
    difference (for both sides), not counted as 0."""
    harness = _benchmark('harness.py')
    from trackstar_jax.eval import stats

    a = np.array([0.5, np.nan, 0.25, 1.0, 0.75])
    b = np.array([0.25, 0.5, np.nan, 0.5, 0.5])
    row = harness.query_intervals({'rho': a, 'rr': b})
    mean, lo, hi = stats.bootstrap_ci([0.5, 0.25, 1.0, 0.75])
    assert row['rho'] == pytest.approx(0.625) and row['rho'] == mean
    assert row['rho_ci'] == [lo, hi]
    assert row['rr'] == pytest.approx(0.4375)
    diff = harness.paired_difference(a, b)
    assert diff == stats.paired_bootstrap([0.5, 1.0, 0.75], [0.25, 0.5, 0.5])
    assert diff['diff'] == pytest.approx(1 / 3)


def test_library_fingerprint_hashes_the_named_sources_and_refuses_a_missing_path():
    """The whole library ('.') hashes as the digest of its .py files (a hand walk);
    a single file hashes differently; a path that is not under trackstar_jax/ is an
    error instead of the digest of nothing."""
    import hashlib

    import trackstar_jax

    harness = _benchmark('harness.py')
    root = os.path.dirname(trackstar_jax.__file__)
    digest = hashlib.sha256()
    for dirpath, dirnames, names in os.walk(os.path.join(root, '.')):
        dirnames.sort()
        for name in sorted(n for n in names if n.endswith('.py')):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, 'rb').read())
    whole = harness.library_fingerprint(['.'])
    assert whole['source_sha256'] == digest.hexdigest()[:16]
    assert whole['source_sha256'] != hashlib.sha256().hexdigest()[:16]
    one = harness.library_fingerprint(['grads/kernel.py'])
    assert one['source_sha256'] not in (whole['source_sha256'], hashlib.sha256().hexdigest()[:16])
    with pytest.raises(ValueError, match='not a file or directory'):
        harness.library_fingerprint(['trackstar_jax'])


def test_publish_writes_the_json_and_regenerates_the_readme_only_when_committed(tmp_path):
    """A committed result's README section is made from the file as written (command
    and timestamp included); a quick or redirected one never touches the README."""
    import json

    harness = _benchmark('harness.py')
    seen = []
    for committed in (False, True):
        path = str(tmp_path / f'r{committed}.json')
        out = harness.publish(path, {'x': 1}, committed=committed, write_readme=seen.append)
        assert out == path
        stored = json.load(open(path))
        assert stored['x'] == 1 and stored['command'].startswith('python ')
    assert seen == [stored]


def test_study_main_routes_quick_and_redirected_runs_away_from_the_committed_json(tmp_path):
    """A benchmark's one command line: a full run publishes at its path (README
    regenerated), --quick into the workdir and --out where it says (README untouched),
    --readme_only only regenerates, and prepare's parser.error stops the run."""
    import json

    harness = _benchmark('harness.py')
    out, work, seen, runs = str(tmp_path / 'bench.json'), str(tmp_path / 'work'), [], []
    os.makedirs(work)

    def run(args):
        runs.append(args)
        return {'quick': args.quick, 'size': args.size}

    def add(parser):
        parser.add_argument('--size', type=int, default=8)

    def prepare(args, parser):
        if args.size < 1:
            parser.error('--size must be positive')
        if args.quick:
            args.size = 2

    def main(*argv):
        return harness.study_main(list(argv), 'A study.\n\nMore.', out, run, seen.append,
                                  workdir=work, add_arguments=add, prepare=prepare)  # fmt: skip

    assert main('--quick')['size'] == 2
    assert json.load(open(os.path.join(work, 'bench_quick.json')))['size'] == 2
    assert not os.path.exists(out) and seen == []
    main('--out', str(tmp_path / 'elsewhere.json'))
    assert os.path.exists(tmp_path / 'elsewhere.json') and not os.path.exists(out) and not seen
    main()
    assert json.load(open(out))['size'] == 8 and seen == [json.load(open(out))]
    assert main('--readme_only') is None and len(seen) == 2 and len(runs) == 3
    with pytest.raises(SystemExit):
        main('--size', '0')
    assert len(runs) == 3


def test_readme_fact_tracing_table_is_generated_from_the_benchmark_json():
    """The README's fact-tracing table and verdicts are the committed benchmark's."""
    module = _benchmark('fact_tracing.py')
    result = _result(os.path.basename(module.OUT))
    assert len(result['runs']) == 2 and result['claims']
    assert module.write_readme(result, check=True), 'run benchmarks/fact_tracing.py --readme_only'


def test_readme_support_samples_table_is_generated_from_the_benchmark_json():
    """The README's support-samples table is the committed benchmark JSON's."""
    module, result = _benchmark('support_samples.py'), _result('support_samples.json')
    assert result['quick'] is False and result['table2']['full_model'] is not None
    assert 'pos' in result and result['layers']['rows'][0].get('non_support_by_pos')
    assert module.write_readme(result, check=True), (
        'run python benchmarks/support_samples.py --readme_only'
    )


def test_readme_methods_table_is_generated_from_the_benchmark_json():
    """The README's LDS table is the committed methods.json's, with every method in it."""
    module, result = _benchmark('lds.py'), _result('methods.json')
    assert result['quick'] is False and result['subsets'] >= 32
    slugs = {m['slug'] for m in result['methods'].values()}
    assert {'trackstar', 'ekfac', 'kfac', 'tracin_cp', 'trak', 'representer'} <= slugs
    assert {'kfac_projected', 'ekfac_projected', 'trak_paper', 'trak_paper_ensemble'} <= slugs
    assert 'one_step_first_order' in slugs
    assert all('one_step_rho' in m and 'frozen_v_rho' in m for m in result['methods'].values())
    assert 'R_eval mixed in' in result['ablations']
    assert module.write_readme(result, check=True), 'run python benchmarks/lds.py --readme_only'


def test_readme_lambda_rule_tables_are_generated_from_the_benchmark_json():
    """The README's λ-rule tables are the committed lambda_rule.json's, every size in it."""
    module, result = _benchmark('lambda_rule.py'), _result('lambda_rule.json')
    assert result['quick'] is False
    sizes = {s['queries_in_r_eval'] for s in result['settings']}
    assert sizes == {4, 8, 16, 32} and {s['kind'] for s in result['settings']} == {
        'mixed',
        'mixed_shrunk',
    }
    assert module.write_readme(result, check=True), (
        'run python benchmarks/lambda_rule.py --readme_only'
    )


def test_readme_open_set_lambda_rule_tables_are_generated_from_the_benchmark_json():
    """The README's open-set λ-rule tables are the committed lambda_rule_open_set.json's."""
    module = _benchmark('lambda_rule_open_set.py')
    result = _result('lambda_rule_open_set.json')
    assert result['queries'] in {s['queries_in_r_eval'] for s in result['settings']}
    assert {s['kind'] for s in result['settings']} == {'mixed', 'mixed_shrunk'}
    assert module.write_readme(result, check=True), (
        'run python benchmarks/lambda_rule_open_set.py --readme_only'
    )


def test_readme_cost_table_is_generated_from_the_benchmark_jsons():
    """The README's costs table is the committed train_index / vs_bergson / pipeline JSONs'."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'cost_table.py'), '--check'],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_step_agreement_tables_are_generated_from_the_benchmark_json():
    """The README's step-agreement tables are the committed step_agreement.json's, with
    the step form's check against the frozen-V step in it."""
    module, result = _benchmark('step_agreement.py'), _result('step_agreement.json')
    assert result['quick'] is False and result['subsets'] >= 32
    step = result['rows']['step form (all params)']
    assert step['frozen_v_rho'] > 0.99, 'the step form must be the frozen-V step itself'
    assert set(module.PARTS) == set(result['parts'])
    assert module.write_readme(result, check=True), (
        'run python benchmarks/step_agreement.py --readme_only'
    )


def test_readme_projection_noise_tables_are_generated_from_the_benchmark_json():
    """The README's projection-noise tables are the committed JSON's, whose dense
    one-sided rows carry the noise the block formula predicts (its check at scale)."""
    module, result = _benchmark('projection_noise.py'), _result('projection_noise.json')
    assert result['quick'] is False and result['queries'] >= 32
    dense = [r for r in result['rows'].values() if r['projection'] == 'one_sided']
    assert dense and all(0.95 < r['noise_over_predicted'] < 1.05 for r in dense)
    assert module.write_readme(result, check=True), (
        'run python benchmarks/projection_noise.py --readme_only'
    )


def test_readme_full_space_r_tables_are_generated_from_the_benchmark_json():
    """The README's full-space R tables are the committed full_space_r.json's: every
    method exact and at each D, and the exact TrackStar row at λ auto's largest-D value."""
    module, result = _benchmark('full_space_r.py'), _result('full_space_r.json')
    assert result['quick'] is False and result['queries'] >= 32
    dims = sorted(int(d) for d in result['lam_auto'])
    assert result['exact_trackstar_lam'] == result['lam_auto'][str(dims[-1])]
    for method in module.METHODS:
        for dim in (None, *dims):
            assert module.row_name(method, dim) in result['rows']
    others = [v for d, v in result['lam_auto'].items() if int(d) != dims[-1]]
    assert set(module.differences(dims, others)) == set(result['differences'])
    assert module.write_readme(result, check=True), (
        'run python benchmarks/full_space_r.py --readme_only'
    )


def test_readme_parameter_scale_tables_are_generated_from_the_benchmark_json():
    """The README's parameter-scaling tables are the committed parameter_scale.json's:
    one model with absolute steps, one trained with parameter scaling, every row and
    difference on each."""
    module, result = _benchmark('parameter_scale.py'), _result('parameter_scale.json')
    assert result['quick'] is False and result['queries'] >= 32
    scaled = [m['multiply_by_parameter_scale'] for m in result['models'].values()]
    assert scaled == [False, True]
    for model in result['models'].values():
        assert set(model['rows']) == {*module.FULL_ROWS, module.PROJECTED}
        assert set(model['parts']) == set(module.PARTS)
    step = result['models']['parameter-scaled steps']['rows'][
        'step form × parameter RMS, all params'
    ]
    assert step['frozen_v_rho'] > 0.99, 'the scaled step form must be the frozen-V step itself'
    assert module.write_readme(result, check=True), (
        'run python benchmarks/parameter_scale.py --readme_only'
    )


def test_projection_noise_prediction_matches_monte_carlo_dense_projections():
    """projection_noise.predicted_noise against 4,000 independent dense N(0, 1/d_b)
    projections of each block of unit x, y, from products built by hand: two blocks and
    an excluded tensor, for the raw and the corrected form (the other form's fields hold
    unrelated values, so reading the wrong ones fails)."""
    from trackstar_jax.eval import full_space

    module = _benchmark('projection_noise.py')
    rng = np.random.default_rng(0)
    sizes, blocks, d = [5, 7, 6, 4], np.array([0, 0, 1, -1]), 16

    def sides():
        q = [rng.normal(size=(2, n)) for n in sizes]
        e = [rng.normal(size=(3, n)) + 0.8 * q[i][:1] for i, n in enumerate(sizes)]
        prod = np.stack([qi @ ei.T for qi, ei in zip(q, e, strict=True)])
        sq = [np.stack([(x * x).sum(1) for x in v]) for v in (q, e)]
        return q, e, prod, *sq

    for form in ('cosine', 'corrected'):
        data, other = sides(), sides()
        raw, corr = (data, other) if form == 'cosine' else (other, data)
        products = full_space.GradientProducts(
            paths=('a', 'b', 'c', 'embedding'), sizes=np.array(sizes), raw=raw[2],
            corrected=corr[2], train_corrected=np.zeros_like(raw[2]), query_sq=raw[3],
            query_sq_corrected=corr[3], example_sq=raw[4], example_sq_corrected=corr[4],
            example_tokens=np.ones(3),
        )  # fmt: skip
        pred = module.predicted_noise(products, form, blocks, d)
        q, e = data[0], data[1]
        cut = [0, sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]]  # the kept tensors
        qu, eu = np.concatenate(q, 1)[:, : cut[-1]], np.concatenate(e, 1)[:, : cut[-1]]
        qu /= np.linalg.norm(qu, axis=1, keepdims=True)
        eu /= np.linalg.norm(eu, axis=1, keepdims=True)
        draws = []
        for _ in range(4000):
            dot = 0.0
            for b in range(2):
                p = rng.normal(scale=d**-0.5, size=(d, cut[b + 1] - cut[b]))
                x, y = qu[:, cut[b] : cut[b + 1]] @ p.T, eu[:, cut[b] : cut[b + 1]] @ p.T
                dot = dot + x @ y.T
            draws.append(dot)
        draws = np.stack(draws)
        np.testing.assert_allclose(draws.mean(0), qu @ eu.T, atol=0.02, err_msg=form)
        np.testing.assert_allclose(draws.std(0), pred, rtol=0.05, err_msg=form)
