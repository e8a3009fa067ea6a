//! `knockq generate`: man pages and shell completions written from the
//! command line's own definition, so they never disagree with `--help`.
//! Packaging runs it (`make deb`); it is hidden from `--help`.

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The section of every page: knockq is an administration tool.
const SECTION: &str = "8";

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Generated {
    /// knockq(8) and one page per subcommand, knockq-run(8) and so on.
    Man,
    /// bash, zsh and fish completions.
    Completions,
}

/// Writes what was asked for into `dir`, which is created; returns the files.
pub fn generate(what: Generated, cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    match what {
        Generated::Man => man_pages(cmd, dir),
        Generated::Completions => [Shell::Bash, Shell::Zsh, Shell::Fish]
            .into_iter()
            .map(|shell| clap_complete::generate_to(shell, &mut cmd.clone(), "knockq", dir))
            .collect(),
    }
}

fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    // Built, subcommands carry their page names (knockq-run) and the
    // generated help subcommand is left out.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let pages = std::iter::once(cmd.clone()).chain(
        cmd.get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .cloned(),
    );
    pages
        .map(|page| {
            clap_mangen::Man::new(page)
                .section(SECTION)
                .generate_to(dir)
        })
        .collect()
}
