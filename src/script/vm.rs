//! One sandboxed Luau VM running one policy's script.
//!
//! The sandbox: only the `string`, `table`, `math` (without `random`),
//! `bit32` and `utf8` libraries and knockq's own; no io, os, debug,
//! require, loadstring, getfenv or setfenv; every global and library table
//! read-only once the script has loaded, so nothing a call does outlives it
//! except the stage the engine keeps. A memory limit per VM and a budget
//! of CPU time per call, enforced by Luau's interrupt, which also stops
//! slow library calls such as a pathological `string.find`.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use ipnet::IpNet;
use mlua::{
    ffi, Function, Lua, LuaOptions, StdLib, Table, UserData, UserDataMethods, Value, VmState,
};

use super::budget::Budget;
use super::FailureKind;
use crate::config::Script;
use crate::engine::{PortMask, ScriptAction, ScriptGrant, ScriptInput, ScriptOutput, Timestamp};
use crate::flow::{FlowPort, PortRange};

/// Time the script's top level may take when it loads.
const LOAD_BUDGET: Duration = Duration::from_secs(1);

/// A failed load or call: what kind, and the message with the script's
/// file and line where Luau knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmError {
    pub kind: FailureKind,
    pub line: Option<usize>,
    pub message: String,
}

/// What the current call has seen and done, shared with the functions the
/// script calls.
struct Call {
    input: Cell<ScriptInput>,
    action: Cell<ScriptAction>,
    budget: Budget,
    /// Set by the interrupt when the budget ran out, with the script's
    /// line it stopped at.
    over_budget: Cell<bool>,
    stopped_at: Cell<Option<usize>>,
    /// Set by `k:grant` when the script asked for more than it may.
    refused: RefCell<Option<(Option<usize>, String)>>,
}

pub struct Vm {
    /// The VM itself: the handler and the tables below live in it.
    lua: Lua,
    handler: Function,
    /// The knock table `k`, made once and passed to every call; frozen, so
    /// no call can leave anything in it for the next.
    knock: Table,
    /// The same table in the registry, for [`Vm::set_knock`].
    knock_key: mlua::RegistryKey,
    call: Rc<Call>,
    budget: Duration,
}

impl Vm {
    /// Loads `script` into a fresh sandbox; fails with the script's file and
    /// line when it does not compile, its top level fails, or it does not
    /// return a function.
    pub fn load(script: &Script) -> Result<Vm, VmError> {
        let call = Rc::new(Call {
            input: Cell::new(ScriptInput {
                src: IpAddr::from([0, 0, 0, 0]),
                port: FlowPort::tcp(0),
                knock_port: false,
                stage: 0,
                last: None,
                granted: false,
                now: Timestamp::default(),
                unix_millis: 0,
            }),
            action: Cell::new(ScriptAction::None),
            budget: Budget::new(),
            over_budget: Cell::new(false),
            stopped_at: Cell::new(None),
            refused: RefCell::new(None),
        });
        let failed = |e: mlua::Error| classify(&e, &call, FailureKind::Load);
        call.budget.start(LOAD_BUDGET);
        let lua = sandbox(script, &call).map_err(failed)?;
        let chunk = lua
            .load(&*script.source)
            .set_name(format!("@{}", script.file.display()));
        let returned: Value = chunk.call(()).map_err(failed)?;
        let Value::Function(handler) = returned else {
            return Err(VmError {
                kind: FailureKind::Load,
                line: None,
                message: format!(
                    "{}: the script must end with `return function(k) ... end`, not return {}",
                    script.file.display(),
                    returned.type_name()
                ),
            });
        };
        freeze(&lua, Value::Table(lua.globals()), &mut HashSet::new()).map_err(failed)?;
        freeze(&lua, Value::Function(handler.clone()), &mut HashSet::new()).map_err(failed)?;
        let knock = knock_table(&lua, script, &call).map_err(failed)?;
        Ok(Vm {
            knock_key: lua.create_registry_value(&knock).map_err(failed)?,
            lua,
            handler,
            knock,
            call,
            budget: script.budget,
        })
    }

    /// Calls the script for one SYN.
    pub fn call(&self, input: &ScriptInput) -> Result<ScriptOutput, VmError> {
        let call = &self.call;
        call.input.set(*input);
        call.action.set(ScriptAction::None);
        call.over_budget.set(false);
        call.stopped_at.set(None);
        let failed = |e: mlua::Error| classify(&e, call, FailureKind::Runtime);
        self.set_knock(input.port.number(), input.stage);
        call.budget.start(self.budget);
        let returned: Value = self.handler.call(&self.knock).map_err(|e| {
            let error = failed(e);
            if error.kind == FailureKind::Memory {
                // Give what the call piled up back before the next one.
                let _ = self.lua.gc_collect();
            }
            error
        })?;
        let stage = match returned {
            Value::Nil => input.stage,
            Value::Integer(n) => u8::try_from(n).map_err(|_| bad_stage(&returned))?,
            Value::Number(n) if n.fract() == 0.0 && (0.0..=255.0).contains(&n) => n as u8,
            other => return Err(bad_stage(&other)),
        };
        Ok(ScriptOutput {
            stage,
            action: call.action.get(),
        })
    }

    /// Sets `k.port` and `k.stage` for the next call. mlua's `raw_set`
    /// guards each write with a protected call, in case it allocates, which
    /// took some 100 ns a field; these two fields exist from the start, so
    /// overwriting them never allocates and cannot fail: straight to Luau.
    fn set_knock(&self, port: u16, stage: u8) {
        self.lua.exec_raw_lua(|raw| {
            let state = raw.state();
            // SAFETY: the main thread's stack always has room for the two
            // values pushed here (Luau keeps LUA_MINSTACK slots free);
            // the table is live (the registry holds it), the keys exist in
            // it, so the raw writes replace values without allocating and
            // cannot raise an error; the stack is left as it was.
            unsafe {
                ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, self.knock_key.id().into());
                ffi::lua_setreadonly(state, -1, 0);
                ffi::lua_pushinteger(state, port.into());
                ffi::lua_rawsetfield(state, -2, c"port".as_ptr());
                ffi::lua_pushinteger(state, stage.into());
                ffi::lua_rawsetfield(state, -2, c"stage".as_ptr());
                ffi::lua_setreadonly(state, -1, 1);
                ffi::lua_pop(state, 1);
            }
        });
    }

    /// Memory the VM holds now.
    #[cfg(test)]
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }
}

/// Makes every table reachable from `value` read-only: the script's
/// globals, the tables they hold, and those its functions keep as
/// upvalues. What the top level built stays as it was for every call.
fn freeze(lua: &Lua, value: Value, seen: &mut HashSet<usize>) -> mlua::Result<()> {
    if !seen.insert(value.to_pointer() as usize) {
        return Ok(());
    }
    match value {
        Value::Table(table) => {
            let entries: Vec<(Value, Value)> = table.pairs().collect::<mlua::Result<_>>()?;
            table.set_readonly(true);
            if let Some(metatable) = table.metatable() {
                freeze(lua, Value::Table(metatable), seen)?;
            }
            for (key, value) in entries {
                freeze(lua, key, seen)?;
                freeze(lua, value, seen)?;
            }
        }
        Value::Function(function) => {
            // SAFETY: pushes the function's upvalues, which lua_getupvalue
            // copies onto the stack, as the results; nothing else.
            let upvalues: mlua::MultiValue = unsafe {
                lua.exec_raw(function, |state| {
                    let mut n = 1;
                    while !mlua::ffi::lua_getupvalue(state, 1, n).is_null() {
                        n += 1;
                    }
                    mlua::ffi::lua_remove(state, 1);
                })
            }?;
            for upvalue in upvalues {
                freeze(lua, upvalue, seen)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn bad_stage(value: &Value) -> VmError {
    VmError {
        kind: FailureKind::Result,
        line: None,
        message: format!(
            "the script returned {}; return the new stage, an integer 0..255, or nothing",
            describe(value)
        ),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Integer(n) => n.to_string(),
        Value::Number(n) => n.to_string(),
        other => format!("a {}", other.type_name()),
    }
}

/// Tells a budget overrun, the memory limit, a refused answer and a plain
/// error apart, and finds the script's line.
fn classify(error: &mlua::Error, call: &Call, otherwise: FailureKind) -> VmError {
    if let Some((line, message)) = call.refused.borrow_mut().take() {
        return VmError {
            kind: FailureKind::Result,
            line,
            message,
        };
    }
    let root = root_cause(error);
    let kind = if call.over_budget.get() {
        FailureKind::Budget
    } else if matches!(root, mlua::Error::MemoryError(_)) {
        FailureKind::Memory
    } else {
        otherwise
    };
    let message = match root {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(message) | mlua::Error::MemoryError(message) => message.clone(),
        other => other.to_string(),
    };
    // Tracebacks and "stack traceback:" tails make the line long: keep the first.
    let message = message.lines().next().unwrap_or_default().to_owned();
    let traceback = match error {
        mlua::Error::CallbackError { traceback, .. } => traceback.as_str(),
        _ => "",
    };
    let line = match kind {
        FailureKind::Budget => call.stopped_at.get(),
        _ => None,
    }
    .or_else(|| line_of(&message))
    .or_else(|| line_of(traceback));
    let message = match kind {
        FailureKind::Budget => "the call ran past its time budget".to_owned(),
        FailureKind::Memory => format!("{message}: the script ran out of its memory limit"),
        _ => message,
    };
    VmError {
        kind,
        line,
        message,
    }
}

fn root_cause(mut error: &mlua::Error) -> &mlua::Error {
    loop {
        match error {
            mlua::Error::CallbackError { cause, .. } => error = cause,
            mlua::Error::WithContext { cause, .. } => error = cause,
            _ => return error,
        }
    }
}

/// The first `file.lua:N:` in `text`.
fn line_of(text: &str) -> Option<usize> {
    text.split(".lua:")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A VM with the sandbox's libraries, limits and interrupt.
fn sandbox(script: &Script, call: &Rc<Call>) -> mlua::Result<Lua> {
    let libraries = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::BIT | StdLib::UTF8;
    let lua = Lua::new_with(libraries, LuaOptions::new())?;
    let globals = lua.globals();
    // Ways out of the sandbox, ways into other calls' data, output, and
    // randomness a replay could not repeat.
    for name in [
        "require",
        "loadstring",
        "getfenv",
        "setfenv",
        "print",
        "collectgarbage",
        "gcinfo",
        "newproxy",
    ] {
        globals.raw_set(name, Value::Nil)?;
    }
    let math: Table = globals.get("math")?;
    math.raw_set("random", Value::Nil)?;
    math.raw_set("randomseed", Value::Nil)?;
    globals.raw_set("knockq", library(&lua, script)?)?;
    lua.set_memory_limit(script.memory_limit)?;
    let interrupt = Rc::clone(call);
    lua.set_interrupt(move |lua| {
        if interrupt.budget.spent() {
            interrupt.over_budget.set(true);
            // The innermost Lua function's line: a library call such as
            // string.find has none.
            let line =
                (0..8).find_map(|level| lua.inspect_stack(level, |d| d.current_line()).flatten());
            interrupt.stopped_at.set(line);
            return Err(mlua::Error::runtime("interrupted"));
        }
        Ok(VmState::Continue)
    });
    // Library tables and the globals become read-only; the script's own
    // globals go to a table of its own, frozen once it has loaded.
    lua.sandbox(true)?;
    Ok(lua)
}

/// The `knockq` library: `knockq.nets{...}` and `knockq.hmac(message)`.
fn library(lua: &Lua, script: &Script) -> mlua::Result<Table> {
    let library = lua.create_table()?;
    library.raw_set(
        "nets",
        lua.create_function(|_, list: Vec<String>| {
            let nets = list
                .iter()
                .map(|text| {
                    text.parse::<IpNet>()
                        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                        .map(|net| net.trunc())
                        .map_err(|_| {
                            mlua::Error::runtime(format!(
                                "knockq.nets: \"{text}\" is not a network such as \"10.0.0.0/8\""
                            ))
                        })
                })
                .collect::<mlua::Result<Vec<IpNet>>>()?;
            Ok(Nets(nets))
        })?,
    )?;
    let secret = script.secret.clone();
    library.raw_set(
        "hmac",
        lua.create_function(move |lua, message: mlua::String| {
            let secret = secret.as_ref().ok_or_else(|| {
                mlua::Error::runtime(
                    "knockq.hmac: the policy has no secret_file in [policy.script]",
                )
            })?;
            lua.create_string(secret.hmac(&message.as_bytes()))
        })?,
    )?;
    Ok(library)
}

/// A set of networks, made by `knockq.nets`; `nets:contains(k)` asks about
/// the knocking source, `nets:contains("10.1.2.3")` about any address.
struct Nets(Vec<IpNet>);

impl UserData for Nets {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("contains", |lua, nets, what: Value| {
            let address = match &what {
                Value::Table(_) => lua
                    .app_data_ref::<Rc<Call>>()
                    .map(|call| call.input.get().src)
                    .ok_or_else(|| mlua::Error::runtime("no knock in progress"))?,
                Value::String(text) => text.to_str()?.parse::<IpAddr>().map_err(|_| {
                    mlua::Error::runtime(format!(
                        "contains: \"{}\" is not an address",
                        text.display()
                    ))
                })?,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "contains: expected the knock or an address, got a {}",
                        other.type_name()
                    )))
                }
            };
            Ok(nets.0.iter().any(|net| net.contains(&address)))
        });
    }
}

/// The knock table: `port` and `stage` set for each call, the rest read on
/// demand through its metatable, `grant` and `revoke` as methods.
fn knock_table(lua: &Lua, script: &Script, call: &Rc<Call>) -> mlua::Result<Table> {
    let knock = lua.create_table()?;
    // Set for each call (`Vm::set_knock`), so they must exist already.
    knock.raw_set("port", 0)?;
    knock.raw_set("stage", 0)?;
    // For `nets:contains(k)`.
    lua.set_app_data(Rc::clone(call));

    let state = Rc::clone(call);
    let open_ports = script.open_ports.clone();
    let limits = (script.max_grant, script.min_prefix_v4, script.min_prefix_v6);
    knock.raw_set(
        "grant",
        lua.create_function(move |lua, (_k, options): (Value, Option<Table>)| {
            let input = state.input.get();
            match grant_options(options, &open_ports, limits, input.src) {
                Ok(grant) => {
                    state.action.set(ScriptAction::Grant(grant));
                    Ok(())
                }
                Err(message) => {
                    let line = lua.inspect_stack(1, |debug| debug.current_line()).flatten();
                    *state.refused.borrow_mut() = Some((line, message.clone()));
                    Err(mlua::Error::runtime(message))
                }
            }
        })?,
    )?;
    let state = Rc::clone(call);
    knock.raw_set(
        "revoke",
        lua.create_function(move |_, _k: Value| {
            state.action.set(ScriptAction::Revoke);
            Ok(())
        })?,
    )?;

    let state = Rc::clone(call);
    let index = lua.create_function(move |lua, (_k, key): (Value, mlua::String)| {
        let input = state.input.get();
        let seconds = |t: Timestamp| t.as_millis() as f64 / 1000.0;
        Ok(match &*key.as_bytes() {
            b"src" => Value::String(lua.create_string(input.src.to_string())?),
            b"family" => Value::Integer(if input.src.is_ipv4() { 4 } else { 6 }),
            b"proto" => Value::String(lua.create_string(input.port.proto().as_str())?),
            b"now" => Value::Number(seconds(input.now)),
            b"wall" => Value::Number(input.unix_millis as f64 / 1000.0),
            b"last" => input.last.map_or(Value::Nil, |t| Value::Number(seconds(t))),
            b"granted" => Value::Boolean(input.granted),
            b"knock" => Value::Boolean(input.knock_port),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "the knock has no field \"{}\" (fields: port, proto, stage, src, family, now, wall, last, granted, knock; methods: grant, revoke)",
                    String::from_utf8_lossy(other)
                )))
            }
        })
    })?;
    let metatable = lua.create_table()?;
    metatable.raw_set("__index", index)?;
    metatable.raw_set("__metatable", "the knock")?;
    metatable.set_readonly(true);
    knock.set_metatable(Some(metatable))?;
    knock.set_readonly(true);
    Ok(knock)
}

/// `k:grant{ ports = {22}, seconds = 3600, prefix = 24 }`, every field
/// optional, checked against the policy.
fn grant_options(
    options: Option<Table>,
    open_ports: &[PortRange],
    (max_grant, min_v4, min_v6): (Duration, u8, u8),
    src: IpAddr,
) -> Result<ScriptGrant, String> {
    let Some(options) = options else {
        return Ok(ScriptGrant {
            ports: PortMask::ALL,
            duration: None,
            prefix: None,
        });
    };
    let field = |name: &str| options.raw_get::<Value>(name).unwrap_or(Value::Nil);
    for pair in options.pairs::<Value, Value>() {
        let (key, _) = pair.map_err(|e| e.to_string())?;
        let known = matches!(&key, Value::String(s) if matches!(&*s.as_bytes(), b"ports" | b"seconds" | b"prefix"));
        if !known {
            return Err(format!(
                "k:grant: unknown option {} (options: ports, seconds, prefix)",
                match &key {
                    Value::String(s) => format!("\"{}\"", s.display()),
                    other => describe(other),
                }
            ));
        }
    }
    let ports = match field("ports") {
        Value::Nil => PortMask::ALL,
        Value::Table(list) => {
            let ports =
                list.sequence_values::<Value>()
                    .map(|port| {
                        let text = match port {
                            Ok(Value::Integer(n)) => n.to_string(),
                            Ok(Value::String(s)) => s.to_string_lossy(),
                            _ => return Err(
                                "k:grant: ports must be a list of ports such as 22 or \"53/udp\""
                                    .to_owned(),
                            ),
                        };
                        PortRange::parse(&text).map_err(|e| format!("k:grant: {e}"))
                    })
                    .collect::<Result<Vec<PortRange>, String>>()?;
            if ports.is_empty() {
                return Err("k:grant: ports is empty".to_owned());
            }
            PortMask::of(open_ports, &ports).map_err(|port| {
                format!("k:grant: port {port} is not one of the policy's open_ports")
            })?
        }
        other => {
            return Err(format!(
                "k:grant: ports must be a list, not {}",
                describe(&other)
            ))
        }
    };
    let duration = match field("seconds") {
        Value::Nil => None,
        Value::Integer(n) => Some(n as f64),
        Value::Number(n) => Some(n),
        other => {
            return Err(format!(
                "k:grant: seconds must be a number, not {}",
                describe(&other)
            ))
        }
    };
    let duration = duration
        .map(|seconds| {
            // Written so that NaN is outside too.
            let within = seconds > 0.0 && seconds <= max_grant.as_secs_f64();
            if !within {
                return Err(format!(
                    "k:grant: {seconds} seconds is outside 0..{} (the policy's max_grant)",
                    max_grant.as_secs_f64()
                ));
            }
            Ok(Duration::from_secs_f64(seconds))
        })
        .transpose()?;
    let prefix = match field("prefix") {
        Value::Nil => None,
        Value::Integer(n) => {
            let (min, max, family) = match src {
                IpAddr::V4(_) => (min_v4, 32, "IPv4"),
                IpAddr::V6(_) => (min_v6, 128, "IPv6"),
            };
            match u8::try_from(n) {
                Ok(length) if (min..=max).contains(&length) => Some(length),
                _ => {
                    return Err(format!(
                        "k:grant: prefix /{n} is outside /{min}../{max} for {family} (the policy's min_prefix)"
                    ))
                }
            }
        }
        other => {
            return Err(format!(
                "k:grant: prefix must be an integer, not {}",
                describe(&other)
            ))
        }
    };
    Ok(ScriptGrant {
        ports,
        duration,
        prefix,
    })
}
