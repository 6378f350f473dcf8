//! Python packages the suite installs with pip into the build directory
//! (`<target>/e2e-python`), so that tests need nothing installed beforehand but Python 3
//! with pip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the suite keeps the Python packages it installs.
pub fn packages_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    target.join("e2e-python")
}

/// Makes `imports` (Python module names, comma separated as in an `import` statement)
/// importable from [`packages_dir`], installing `package` with pip when they are not; returns
/// the directory to put on `PYTHONPATH`. Callers that run in parallel in one process should
/// call it once (a `OnceLock`), so that two pip runs do not write the folder at once.
pub fn ensure(imports: &str, package: &str) -> PathBuf {
    let dir = packages_dir();
    let importable = || {
        Command::new("python3")
            .args(["-c", &format!("import {imports}")])
            .env("PYTHONPATH", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return dir;
    }
    let output = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location"])
        .arg("--target")
        .arg(&dir)
        .arg(package)
        .output()
        .expect("cannot run python3 -m pip (Python 3 with pip is needed for this test)");
    assert!(
        output.status.success() && importable(),
        "pip could not install {package} into {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}
