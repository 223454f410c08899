import json
import os
import subprocess
import sys



_RSS = """
import json
def _kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
"""


def peak_rss_growth_mb(code: str) -> float:
    """Runs `code` in a fresh Python and returns how far the peak resident set rose
    (MB) above the resident set at the line '# measure', during what follows it.
    The kernel's high-water mark is reset there (clear_refs 5), so the setup's own
    peak does not hide the measured one."""
    before, after = code.split("# measure")
    script = (
        _RSS + before +
        "\nopen('/proc/self/clear_refs', 'w').write('5')\nr0 = _kb('VmRSS:')\n" + after +
        "\nprint(json.dumps((_kb('VmHWM:') - r0) / 1024))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(out.stdout.strip().splitlines()[-1])
