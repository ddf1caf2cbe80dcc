//! Config directories that a test rewrites while meshlimit watches them: a plain directory,
//! and the layout Kubernetes gives a mounted ConfigMap.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// A fresh temporary directory holding `files` (name, text).
pub fn plain(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().expect("create a temp config dir");
    for (name, text) in files {
        write_file(&dir.path().join(name), text);
    }
    dir
}

/// Replaces `dir/name` in one step: the text goes to a dot-file first (meshlimit skips
/// names starting with a dot), then a rename puts it in place, so a reader sees the old
/// file or the new one, never a half-written one.
pub fn write_atomically(dir: &Path, name: &str, text: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    write_file(&temp, text);
    let target = dir.join(name);
    fs::rename(&temp, &target)
        .unwrap_or_else(|err| panic!("rename {} to {}: {err}", temp.display(), target.display()));
}

fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}

/// A directory laid out as the kubelet mounts a ConfigMap:
///
/// ```text
/// ..2026_01_01_00_00_00.1/edge.yaml     the files of one version
/// ..data -> ..2026_01_01_00_00_00.1     the version being served
/// edge.yaml -> ..data/edge.yaml         what readers open
/// ```
///
/// An update writes a new timestamped directory, points a temporary symlink at it and
/// renames that over `..data`, the one atomic step; then it adds and removes the visible
/// links and deletes the old version, as the kubelet's `AtomicWriter` does.
pub struct ConfigMapDir {
    dir: TempDir,
    /// Where the ConfigMap is mounted: `dir` itself, or a directory below it.
    mount: PathBuf,
    generation: u32,
}

impl ConfigMapDir {
    pub fn new(files: &[(&str, &str)]) -> ConfigMapDir {
        ConfigMapDir::mounted_at("", files)
    }

    /// Mounted at `below` inside a fresh directory (`root()`), as envoyproxy/ratelimit's
    /// deployments mount theirs at `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config`.
    pub fn mounted_at(below: &str, files: &[(&str, &str)]) -> ConfigMapDir {
        let dir = tempfile::tempdir().expect("create a temp ConfigMap dir");
        let mount = dir.path().join(below);
        fs::create_dir_all(&mount).expect("create the ConfigMap mount point");
        let mut config_map = ConfigMapDir {
            dir,
            mount,
            generation: 0,
        };
        config_map.update(files);
        config_map
    }

    /// The mount point: what `--config` names.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The directory the mount point is inside.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Swaps in a new version holding exactly `files`.
    pub fn update(&mut self, files: &[(&str, &str)]) {
        let root = self.mount.as_path();
        let previous = self.version_dir();
        self.generation += 1;
        let version = self.version_name();
        fs::create_dir(root.join(&version)).expect("create the ConfigMap version dir");
        for (name, text) in files {
            write_file(&root.join(&version).join(name), text);
        }

        let data_tmp = root.join("..data_tmp");
        symlink(&version, &data_tmp).expect("link ..data_tmp to the new version");
        fs::rename(&data_tmp, root.join("..data")).expect("rename ..data_tmp over ..data");

        for (name, _) in files {
            let link = root.join(name);
            if fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(name), &link).expect("link a visible file");
            }
        }
        for entry in fs::read_dir(root)
            .expect("list the ConfigMap dir")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let visible = !name.starts_with('.');
            if visible && !files.iter().any(|(file, _)| *file == name) {
                fs::remove_file(entry.path()).expect("remove a link to a dropped file");
            }
        }
        if let Some(previous) = previous {
            fs::remove_dir_all(&previous).expect("remove the previous ConfigMap version");
        }
    }

    fn version_name(&self) -> String {
        format!("..2026_01_01_00_00_00.{}", self.generation)
    }

    fn version_dir(&self) -> Option<PathBuf> {
        (self.generation > 0).then(|| self.mount.join(self.version_name()))
    }
}
