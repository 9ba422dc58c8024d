//! `wasmsub new NAME --lang rust|python|js`: a handler project that builds
//! and passes its own test out of the box, against the WIT contract this
//! binary was built with (it is written into the project, so the project
//! and the host agree on it).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The languages a project can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `wasmsub-guest` crate (bindings, helpers, a test double).
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js (jco).
    Js,
}

/// One file of a template: where it goes, and its text with `{{name}}`,
/// `{{module}}` and `{{component}}` to fill in.
struct Template {
    path: &'static str,
    text: &'static str,
}

macro_rules! template {
    ($path:literal, $source:literal) => {
        Template { path: $path, text: include_str!($source) }
    };
}

const WIT: Template = template!("wit/handler.wit", "../../../wit/handler.wit");

const RUST: &[Template] = &[
    template!("Cargo.toml", "../../templates/rust/Cargo.toml.tmpl"),
    template!("src/lib.rs", "../../templates/rust/src/lib.rs.tmpl"),
    template!("README.md", "../../templates/rust/README.md.tmpl"),
    template!("event.json", "../../templates/rust/event.json.tmpl"),
    template!("wasmsub.toml", "../../templates/rust/wasmsub.toml.tmpl"),
    template!(".gitignore", "../../templates/rust/gitignore.tmpl"),
    // The guest library, vendored: the project builds without this repository.
    template!("wasmsub-guest/Cargo.toml", "../../../guests/wasmsub-guest/Cargo.toml"),
    template!("wasmsub-guest/src/lib.rs", "../../../guests/wasmsub-guest/src/lib.rs"),
    template!("wasmsub-guest/src/testing.rs", "../../../guests/wasmsub-guest/src/testing.rs"),
];

const PYTHON: &[Template] = &[
    template!("handler.py", "../../templates/python/handler.py.tmpl"),
    template!("app.py", "../../templates/python/app.py.tmpl"),
    template!("test_handler.py", "../../templates/python/test_handler.py.tmpl"),
    template!("build.sh", "../../templates/python/build.sh.tmpl"),
    template!("test.sh", "../../templates/python/test.sh.tmpl"),
    template!("README.md", "../../templates/python/README.md.tmpl"),
    template!("event.json", "../../templates/python/event.json.tmpl"),
    template!("wasmsub.toml", "../../templates/python/wasmsub.toml.tmpl"),
    template!(".gitignore", "../../templates/python/gitignore.tmpl"),
];

const JS: &[Template] = &[
    template!("handler.js", "../../templates/js/handler.js.tmpl"),
    template!("index.js", "../../templates/js/index.js.tmpl"),
    template!("handler.test.js", "../../templates/js/handler.test.js.tmpl"),
    template!("package.json", "../../templates/js/package.json.tmpl"),
    template!("build.mjs", "../../templates/js/build.mjs.tmpl"),
    template!("build.sh", "../../templates/js/build.sh.tmpl"),
    template!("test.sh", "../../templates/js/test.sh.tmpl"),
    template!("README.md", "../../templates/js/README.md.tmpl"),
    template!("event.json", "../../templates/js/event.json.tmpl"),
    template!("wasmsub.toml", "../../templates/js/wasmsub.toml.tmpl"),
    template!(".gitignore", "../../templates/js/gitignore.tmpl"),
];

/// Where each language's project puts the WIT, and its built component.
fn layout(lang: Lang) -> (&'static [Template], &'static str, &'static str) {
    match lang {
        Lang::Rust => (RUST, "wasmsub-guest/wit/handler.wit", "target/wasm32-wasip2/release/{{module}}.wasm"),
        Lang::Python => (PYTHON, "wit/handler.wit", "{{module}}.wasm"),
        Lang::Js => (JS, "wit/handler.wit", "{{module}}.wasm"),
    }
}

/// Writes a `lang` project for handler `name` into `dir` (which must not
/// exist, or be empty). Returns the files written.
pub fn create(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<Vec<PathBuf>> {
    check_name(name)?;
    if dir.exists() && std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_some() {
        anyhow::bail!("{} exists and is not empty; choose another --dir", dir.display());
    }
    let (templates, wit_path, component) = layout(lang);
    let module = name.replace('-', "_");
    let fill = |text: &str| text.replace("{{component}}", component).replace("{{name}}", name).replace("{{module}}", &module);
    let mut written = Vec::new();
    let wit = Template { path: wit_path, text: WIT.text };
    for template in templates.iter().chain(std::iter::once(&wit)) {
        let path = dir.join(template.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // The WIT and the vendored library are copied as they are.
        let verbatim = template.path == wit_path || template.path.starts_with("wasmsub-guest/");
        let text = if verbatim { template.text.to_owned() } else { fill(template.text) };
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A handler name is also a topic, a crate and a module name: lowercase
/// letters, digits and `-`, starting with a letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && name.len() <= 64;
    anyhow::ensure!(valid, "`{name}` is not a handler name: use lowercase letters, digits and `-`, starting with a letter (e.g. `task-created`)");
    Ok(())
}

/// What to do next, printed after the project is written.
pub fn next_steps(dir: &Path, lang: Lang) -> String {
    let dir = dir.display();
    match lang {
        Lang::Rust => format!(
            "cd {dir}\ncargo test                                     # the handler's tests, natively\n\
             cargo build --release --target wasm32-wasip2   # the component (rustup target add wasm32-wasip2)\n\
             wasmsub invoke target/wasm32-wasip2/release/*.wasm --event event.json"
        ),
        Lang::Python => format!("cd {dir}\npython3 -m unittest          # the handler's tests, natively\nbash build.sh                # the component (installs componentize-py in a venv)\nbash test.sh                 # build, then one event through the real sandbox"),
        Lang::Js => format!("cd {dir}\nnode --test                  # the handler's tests, natively\nbash build.sh                # the component (installs jco and componentize-js)\nbash test.sh                 # build, then one event through the real sandbox"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_topics_and_crates() {
        assert!(check_name("task-created").is_ok());
        for bad in ["", "Task", "9lives", "a_b", "a-", "a b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_project_is_written_with_the_wit_and_the_name_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        let files = create(&project, "task-done", Lang::Rust).unwrap();
        assert!(files.iter().any(|f| f.ends_with("wasmsub-guest/wit/handler.wit")));
        let cargo = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("name = \"task-done\""), "{cargo}");
        let manifest = std::fs::read_to_string(project.join("wasmsub.toml")).unwrap();
        assert!(manifest.contains("target/wasm32-wasip2/release/task_done.wasm"), "{manifest}");
        assert!(!std::fs::read_to_string(project.join("src/lib.rs")).unwrap().contains("{{"));
        assert!(create(&project, "task-done", Lang::Rust).is_err(), "a non-empty directory is refused");
    }
}
