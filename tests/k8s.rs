//! `deploy/k8s/`: no cluster runs here, so the manifests are validated against the
//! Kubernetes OpenAPI schemas (the `kubernetes-validate` package, offline, strict:
//! unknown fields are errors) for the oldest and newest versions they support, and
//! their wiring is checked: the completion index reaches `--rank` through
//! `JOB_COMPLETION_INDEX`, `completions == parallelism == --world`, the metrics port is
//! the one announced for scraping, GPUs are requested, the weights come read-only from
//! a volume, the store is on S3. The container's own arguments are then run by the
//! binary with the index a pod would get.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::run::{ok, served_job};
use crate::util::{deploy_python, root, tempdir, tensorbake};

/// CronJob `timeZone` is GA from 1.27; the newest schema the validator ships.
const VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

fn k8s_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn validate(python: &Path, version: &str, files: &[PathBuf]) -> Output {
    Command::new(python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            version,
        ])
        .args(files)
        .output()
        .expect("run kubernetes_validate")
}

/// Every document of every file, as JSON, by `kind`.
fn documents(python: &Path, files: &[PathBuf]) -> Vec<serde_json::Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
                  print(json.dumps(docs))";
    let o = Command::new(python)
        .args(["-c", script])
        .args(files)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap()
}

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("{name} not in {args:?}"));
    &args[i + 1]
}

#[test]
fn k8s_manifests_validate_and_wire_index_world_metrics_gpus_weights_and_s3() {
    let Some(python) = deploy_python("k8s_manifests_validate", &["kubernetes_validate", "yaml"])
    else {
        return;
    };
    let files = k8s_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "configmap.yaml",
            "cronjob.yaml",
            "indexed-job.yaml",
            "s3-secret.example.yaml"
        ]
    );
    for v in VERSIONS {
        let o = validate(&python, v, &files);
        assert!(
            o.status.success(),
            "deploy/k8s does not validate against Kubernetes {v}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // the validator is strict: a misspelt field and a wrong type are caught, naming them
    let dir = tempdir();
    let job_text = std::fs::read_to_string(root().join("deploy/k8s/indexed-job.yaml")).unwrap();
    for (from, to, needle) in [
        ("parallelism: 8", "paralelism: 8", "paralelism"),
        (
            "completionMode: Indexed",
            "completionMode: 3",
            "completionMode",
        ),
        (
            "containerPort: 9400",
            "containerPort: \"metrics\"",
            "containerPort",
        ),
    ] {
        let bad = dir.path().join("bad.yaml");
        assert!(job_text.contains(from), "{from}");
        std::fs::write(&bad, job_text.replace(from, to)).unwrap();
        let o = validate(&python, VERSIONS[1], &[bad]);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.status.success(), "{to} passed validation");
        assert!(said.contains(needle), "{needle} not named: {said}");
    }

    let docs = documents(&python, &files);
    let by_kind = |kind: &str| -> &serde_json::Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let job = by_kind("Job");
    let cron = by_kind("CronJob");
    let config = by_kind("ConfigMap");
    let secret = by_kind("Secret");
    // the nightly Job is the Indexed Job, field for field
    assert_eq!(cron["spec"]["jobTemplate"]["spec"], job["spec"]);
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(
        cron["spec"]["schedule"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        5
    );

    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let pod = &spec["template"];
    let c = &pod["spec"]["containers"][0];
    let args = strs(&c["args"]);
    assert_eq!(args[0], "run");
    assert!(
        !args.iter().any(|a| a == "--rank"),
        "the index gives the rank"
    );
    let world: u64 = flag(&args, "--world").parse().unwrap();
    assert_eq!(spec["completions"], world);
    assert_eq!(spec["parallelism"], world);
    assert!(matches!(
        pod["spec"]["restartPolicy"].as_str(),
        Some("OnFailure" | "Never")
    ));
    let env = c["env"].as_array().unwrap();
    let index = env
        .iter()
        .find(|e| e["name"] == "JOB_COMPLETION_INDEX")
        .expect("JOB_COMPLETION_INDEX in env");
    assert_eq!(
        index["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    // metrics: the port served is the port declared and announced
    let metrics = flag(&args, "--metrics");
    let port: u64 = metrics.strip_prefix(':').expect(":PORT").parse().unwrap();
    let declared = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(declared["containerPort"], port);
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], port.to_string());
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    // one GPU per pod, requested and limited
    assert_eq!(c["resources"]["requests"]["nvidia.com/gpu"], "1");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    // volumes: the manifest from the ConfigMap, weights read-only from a claim
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"))
    };
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert_eq!(mount("weights")["readOnly"], true);
    assert!(volume("weights")["persistentVolumeClaim"]["claimName"].is_string());
    let manifest_dir = mount("manifest")["mountPath"].as_str().unwrap();
    assert_eq!(
        volume("manifest")["configMap"]["name"],
        config["metadata"]["name"]
    );
    let key = args[1]
        .strip_prefix(&format!("{manifest_dir}/"))
        .expect("the manifest is read from the ConfigMap mount");
    let manifest = config["data"][key]
        .as_str()
        .expect("the ConfigMap holds it");
    // S3 credentials from the Secret; the store on S3; every encoder's weights and
    // every source file under the weights mount
    let from = c["envFrom"][0]["secretRef"]["name"].as_str().unwrap();
    assert_eq!(from, secret["metadata"]["name"]);
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
        assert!(secret["stringData"][k].is_string(), "{k}");
    }
    let weights_dir = mount("weights")["mountPath"].as_str().unwrap();
    let parsed: toml::Table = manifest.parse().unwrap();
    assert!(parsed["store"].as_str().unwrap().starts_with("s3://"));
    let encoders = parsed["encoders"].as_array().unwrap();
    assert!(!encoders.is_empty());
    for e in encoders {
        assert!(
            e["weights"].as_str().unwrap().starts_with(weights_dir),
            "{e}"
        );
        assert_eq!(e["device"].as_str(), Some("cuda"));
    }
    // the binary reads it: no unknown key, it gets as far as the missing files
    let m = dir.path().join("configmap-manifest.toml");
    std::fs::write(&m, manifest).unwrap();
    let o = tensorbake(dir.path(), &["run", m.to_str().unwrap(), "--output", "x"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(weights_dir) && !stderr.contains("unknown"),
        "{stderr}"
    );

    // the container's own arguments, as pod 3 runs them: rank 3 of 8, from the index
    let (job_manifest, _, _server) = served_job(dir.path(), 8, 2, "");
    let mut pod_args = args.clone();
    pod_args[1] = job_manifest.to_string_lossy().into_owned();
    let set = |args: &mut Vec<String>, name: &str, value: &str| {
        let i = args.iter().position(|a| a == name).unwrap();
        args[i + 1] = value.to_string();
    };
    let report_path = dir.path().join("report.json");
    set(&mut pod_args, "--metrics", "127.0.0.1:0");
    set(&mut pod_args, "--metrics-hold", "0");
    set(&mut pod_args, "--report", report_path.to_str().unwrap());
    let o = Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(&pod_args)
        .current_dir(dir.path())
        .env("JOB_COMPLETION_INDEX", "3")
        .output()
        .unwrap();
    let report = ok(&o);
    assert_eq!(report["rank"], 3, "{report:#}");
    assert_eq!(report["world"], world);
    assert_eq!(report["rank_from"], "JOB_COMPLETION_INDEX + --world");
    assert_eq!(report["shards"]["committed"], 1); // shard 3 of 0..8
    assert_eq!(report["committed_parts"][0]["shard"], "shard-000003.tar");
    assert!(report_path.is_file());
    // and without the index the same arguments refuse to guess a rank
    let o = Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(&pod_args)
        .current_dir(dir.path())
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("RANK")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--world needs --rank (or JOB_COMPLETION_INDEX)"),
        "{stderr}"
    );
}
