//! Reading a configuration file: the TOML into its serde shapes, the
//! structure checked (policy names, one knock per policy, hooks, scope,
//! `[cluster]`), and, once the engine has checked what the policies mean,
//! the files they name read into a [`Config`].

use std::collections::HashMap;
use std::path::Path;

use toml::Spanned;

use super::file::{ErrorContext, RawConfig, RawPolicy, RawScript};
use super::{
    ClusterConfig, Config, ConfigError, Knock, Policy, PolicyHooks, Scope, Script,
    HOOK_PLACEHOLDERS,
};
use crate::flow::PortRange;
use crate::rotating::Secret;

/// A configuration file read and its structure checked: what the engine
/// checks the meaning of (`engine::check`) before it becomes a [`Config`].
pub struct Document<'a> {
    pub(crate) errors: ErrorContext<'a>,
    pub(crate) raw: RawConfig,
    cluster: Option<ClusterConfig>,
}

/// Reads configuration text from `path` (for error messages and relative
/// file paths), checking its syntax and structure.
pub fn read<'a>(text: &'a str, path: &'a Path) -> Result<Document<'a>, ConfigError> {
    let errors = ErrorContext { text, path };
    let mut raw: RawConfig = errors.deserialize(text)?;
    if raw.policies.is_empty() {
        return Err(errors.at(
            None,
            "policy".into(),
            "no [[policy]] table: there is nothing to open",
        ));
    }
    if u32::from(raw.queue.num) + u32::from(raw.queue.count) > 1 << 16 {
        return Err(errors.at(
            None,
            "queue".into(),
            &format!(
                "queues {}..{} go past 65535",
                raw.queue.num,
                u32::from(raw.queue.num) + u32::from(raw.queue.count) - 1
            ),
        ));
    }
    let cluster = raw
        .cluster
        .take()
        .map(|c| c.validate(&errors))
        .transpose()?;
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, policy) in raw.policies.iter().enumerate() {
        let name = policy.name.get_ref().as_str();
        let key = |field: &str| format!("policy[{i}].{field}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            let message = format!("name \"{name}\" must be letters, digits, '-' or '_'");
            return Err(errors.spanned(&policy.name, key("name"), message));
        }
        if let Some(first) = names.insert(name, i) {
            let message = format!("policy name \"{name}\" is already used by policy[{first}]");
            return Err(errors.spanned(&policy.name, key("name"), message));
        }
        if policy.open_ports.get_ref().is_empty() {
            let message = "open_ports is empty: give at least one port to open".to_owned();
            return Err(errors.spanned(&policy.open_ports, key("open_ports"), message));
        }
        let knocks = [
            policy.sequence.as_ref().map(|s| ("sequence", s.span())),
            policy.rotating.as_ref().map(|r| ("rotating", r.span())),
            policy.script.as_ref().map(|s| ("script", s.span())),
            policy.spa.as_ref().map(|s| ("spa", s.span())),
        ];
        let mut given = knocks.iter().flatten();
        match (given.next(), given.next()) {
            (Some(_), None) => {}
            (Some((field, span)), Some(_)) => {
                let message =
                    "give one of sequence, [policy.rotating], [policy.script] or [policy.spa]";
                return Err(errors.at(Some(span.clone()), key(field), message));
            }
            (None, _) => {
                let message =
                    "no knock: give a sequence of ports, a [policy.rotating], a [policy.script] or a [policy.spa] table";
                return Err(errors.spanned(&policy.name, key("sequence"), message.to_owned()));
            }
        }
        for (hook, name) in [
            (&policy.on_grant, "on_grant"),
            (&policy.on_revoke, "on_revoke"),
        ] {
            if let Some(hook) = hook {
                check_hook(hook, name, &errors, &key)?;
            }
        }
        check_scope(policy, cluster.is_some(), &errors, &key)?;
    }
    // Users in files of their own are part of the structure: the engine
    // checks their ports with every other.
    for (i, policy) in raw.policies.iter_mut().enumerate() {
        if let Some(spa) = &mut policy.spa {
            let key = |field: &str| format!("policy[{i}].{field}");
            spa.get_mut().read_users_dir(&errors, &key)?;
        }
    }
    Ok(Document {
        errors,
        raw,
        cluster,
    })
}

impl Document<'_> {
    /// The configuration, with the files its policies name read: call once
    /// the engine has checked what the policies mean.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let Document {
            errors,
            raw,
            cluster,
        } = self;
        let mut policies = Vec::with_capacity(raw.policies.len());
        for (i, policy) in raw.policies.into_iter().enumerate() {
            let key = |field: &str| format!("policy[{i}].{field}");
            let open_ports = policy.open_ports.into_inner();
            let knock = match (
                policy.sequence,
                &policy.rotating,
                &policy.script,
                &policy.spa,
            ) {
                (Some(sequence), ..) => Knock::Fixed(sequence.into_inner()),
                (None, Some(rotating), ..) => {
                    Knock::Rotating(rotating.get_ref().read(&errors, &key)?)
                }
                (None, None, Some(script), _) => {
                    Knock::Script(read_script(script.get_ref(), &open_ports, &errors, &key)?)
                }
                (None, None, None, Some(spa)) => {
                    Knock::Spa(spa.get_ref().read(&open_ports, &errors, &key)?)
                }
                (None, None, None, None) => {
                    unreachable!("read() refuses a policy without a knock")
                }
            };
            policies.push(Policy {
                name: policy.name.into_inner(),
                knock,
                step_timeout: policy.step_timeout,
                open_ports,
                close_port: policy.close_port.map(Spanned::into_inner),
                grant_timeout: policy.grant_timeout,
                strict: policy.strict,
                hooks: PolicyHooks {
                    on_grant: policy.on_grant.map(Spanned::into_inner),
                    on_revoke: policy.on_revoke.map(Spanned::into_inner),
                },
                scope: policy.scope.map(Spanned::into_inner).unwrap_or_default(),
                offline: policy.offline.map(Spanned::into_inner).unwrap_or_default(),
            });
        }
        Ok(Config {
            queue: raw.queue,
            verdict: raw.verdict,
            limits: raw.limits,
            metrics: raw.metrics,
            control: raw.control,
            state: raw.state,
            rules: raw.rules,
            hooks: raw.hooks,
            cluster,
            policies,
        })
    }
}

/// A script policy's settings, with its text and secret read.
fn read_script(
    raw: &RawScript,
    open_ports: &[PortRange],
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<Script, ConfigError> {
    let secret = raw
        .secret_file
        .as_ref()
        .map(|file| {
            Secret::load(&errors.relative_path(file.get_ref()))
                .map_err(|e| errors.spanned(file, key("script.secret_file"), e.to_string()))
        })
        .transpose()?;
    let file = errors.relative_path(raw.file.get_ref());
    let source = std::fs::read_to_string(&file).map_err(|e| {
        errors.spanned(
            &raw.file,
            key("script.file"),
            format!("{}: {e}", file.display()),
        )
    })?;
    Ok(Script {
        file,
        source: source.into(),
        knock_ports: raw.knock_ports.get_ref().clone(),
        open_ports: open_ports.to_vec(),
        budget: raw.budget,
        memory_limit: *raw.memory_mib.get_ref() as usize * 1024 * 1024,
        max_grant: raw.max_grant,
        min_prefix_v4: *raw.min_prefix_v4.get_ref(),
        min_prefix_v6: *raw.min_prefix_v6.get_ref(),
        secret,
    })
}

/// A hook's argument vector: a program and its arguments, placeholders
/// among [`HOOK_PLACEHOLDERS`].
fn check_hook(
    hook: &Spanned<Vec<String>>,
    name: &str,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let argv = hook.get_ref();
    let fail = |message: String| Err(errors.spanned(hook, key(name), message));
    if argv.first().is_none_or(|program| program.is_empty()) {
        return fail(
            "give the program and its arguments, such as [\"/usr/sbin/nft\", ...]".to_owned(),
        );
    }
    for arg in argv {
        let mut rest = arg.as_str();
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let word: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if after[word.len()..].starts_with('}')
                && !word.is_empty()
                && !HOOK_PLACEHOLDERS.contains(&word.as_str())
            {
                return fail(format!(
                    "unknown placeholder {{{word}}} (placeholders: {})",
                    HOOK_PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                ));
            }
            rest = after;
        }
    }
    Ok(())
}

/// `scope = "cluster"` needs a `[cluster]`; `offline` is for cluster
/// rotating policies, the only ones that claim windows.
fn check_scope(
    policy: &RawPolicy,
    clustered: bool,
    errors: &ErrorContext,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let scope = policy.scope.as_ref();
    let cluster = scope.is_some_and(|s| *s.get_ref() == Scope::Cluster);
    if let (true, false, Some(scope)) = (cluster, clustered, scope) {
        let message = "scope \"cluster\" needs a [cluster] section naming the etcd endpoints";
        return Err(errors.spanned(scope, key("scope"), message.to_owned()));
    }
    if let Some(offline) = &policy.offline {
        if !cluster || policy.rotating.is_none() {
            let message = "offline applies to rotating policies with scope \"cluster\" only";
            return Err(errors.spanned(offline, key("offline"), message.to_owned()));
        }
    }
    Ok(())
}
