# @summary Installs, configures and runs the knockq port-knocking gate.
#
# Each section parameter is a hash of knockq.toml's keys for that section
# (a nested hash becomes a sub-table); an empty hash leaves the section out,
# so knockq's defaults apply. See README.md, "Configuration".
#
# @param package_path A .deb on the node to install; empty: the package
#   named by `package` from the configured repositories.
# @param policies The [[policy]] tables, in order. Script and secret files
#   are named by absolute path: the file is checked from a temporary copy.
# @param service_enabled Enable and start the service (started only where
#   systemd runs).
class knockq (
  String $package_path = '',
  String $package = 'knockq',
  String $config_path = '/etc/knockq/knockq.toml',
  Hash $queue = {},
  Hash $verdict = {},
  Hash $limits = {},
  Hash $metrics = {},
  Hash $control = {},
  Hash $state = {},
  Hash $rules = {},
  Hash $hooks = {},
  Hash $cluster = {},
  Array[Hash, 1] $policies,
  Boolean $service_enabled = true,
) {
  if $package_path != '' {
    package { 'knockq':
      ensure   => installed,
      provider => dpkg,
      source   => $package_path,
    }
  } else {
    package { 'knockq':
      ensure => installed,
      name   => $package,
    }
  }

  $sections = {
    'queue'   => $queue,
    'verdict' => $verdict,
    'limits'  => $limits,
    'metrics' => $metrics,
    'control' => $control,
    'state'   => $state,
    'rules'   => $rules,
    'hooks'   => $hooks,
    'cluster' => $cluster,
  }

  # The new file replaces the old one only if `knockq check` accepts it: a
  # bad parameter leaves the running configuration in place.
  file { $config_path:
    ensure       => file,
    owner        => 'root',
    group        => 'root',
    mode         => '0644',
    content      => template('knockq/knockq.toml.erb'),
    validate_cmd => '/usr/bin/knockq check --config %',
    require      => Package['knockq'],
  }

  if $service_enabled {
    if $facts['knockq_systemd_running'] {
      # knockq re-reads its configuration on reload, keeping its grants.
      service { 'knockq':
        ensure    => running,
        enable    => true,
        provider  => systemd,
        restart   => '/bin/systemctl reload knockq',
        subscribe => File[$config_path],
      }
    } else {
      # Without systemd running, systemctl enables offline, by symlink.
      exec { 'enable knockq':
        command => '/bin/systemctl enable knockq',
        unless  => '/bin/systemctl is-enabled --quiet knockq',
        require => File[$config_path],
      }
      notify { 'knockq not started':
        message => 'systemd is not running here (no /run/systemd/system): knockq was enabled but not started',
        require => Exec['enable knockq'],
      }
    }
  }
}
