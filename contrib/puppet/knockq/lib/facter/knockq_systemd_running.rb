# Whether systemd is the running init (sd_booted(3)'s test): the class
# starts the service only then.
Facter.add(:knockq_systemd_running) do
  setcode { File.directory?('/run/systemd/system') }
end
