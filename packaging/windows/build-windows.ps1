# Build the Windows installer of repomem: PyInstaller onedir bundle + Inno Setup installer.
# NOT RUN by the project's CI (no Windows machine there): a maintainer runs it on Windows. See packaging/README.md.
#
#   powershell -ExecutionPolicy Bypass -File packaging\windows\build-windows.ps1 [-Backend cpu|cuda|keep] [-OutDir DIR]
#
# Needs: Windows 10/11 x64, Python 3.11+ with the project installed in .venv (python -m venv .venv;
# .venv\Scripts\pip install -e .[test]), Visual Studio 2022 Build Tools (C++ workload, for repomem.native and
# llama.cpp), CMake, Inno Setup 6 (iscc.exe on PATH or in its default folder). For -Backend cuda also the
# CUDA Toolkit 12.x (nvcc; its VS integration), run from a "x64 Native Tools Command Prompt for VS 2022".
#
#   -Backend cpu   (default) rebuild llama-cpp-python 0.3.36 portable (GGML_NATIVE=OFF, AVX2 baseline)
#   -Backend cuda  rebuild with -DGGML_CUDA=on (architectures from $env:CUDA_ARCHS, default 75;80;86;89;90);
#                  the bundle carries cudart64_12.dll + cublas64_12.dll + cublasLt64_12.dll (~600 MB);
#                  the NVIDIA driver (nvcuda.dll) comes from the user's system
#   -Backend keep  use the environment's llama-cpp-python as it is
param(
    [ValidateSet("cpu", "cuda", "keep")] [string] $Backend = "cpu",
    [string] $OutDir = "",
    [string] $Python = ""
)
$ErrorActionPreference = "Stop"
$Here = Split-Path -Parent $MyInvocation.MyCommand.Path
$Pkg = Split-Path -Parent $Here
$Repo = Split-Path -Parent $Pkg
if (-not $OutDir) { $OutDir = Join-Path $Pkg "out" }
New-Item -ItemType Directory -Force -Path $OutDir | Out-Null
if (-not $Python) { $Python = Join-Path $Repo ".venv\Scripts\python.exe" }
function Log($m) { Write-Host "[build-windows] $m" }
function Run($exe, [string[]] $argv) {
    & $exe @argv
    if ($LASTEXITCODE -ne 0) { throw "$exe $($argv -join ' ') failed with exit code $LASTEXITCODE" }
}

& $Python -c "import llama_cpp, PySide6"
if ($LASTEXITCODE -ne 0) { throw "$Python lacks the app's dependencies (pip install -e .[test])" }
& $Python -c "import PyInstaller" 2>$null
if ($LASTEXITCODE -ne 0) { Run $Python @("-m", "pip", "install", "-q", "pyinstaller>=6.10,<7") }

# 1. llama.cpp for the chosen backend. --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS.
if ($Backend -ne "keep") {
    if ($Backend -eq "cuda") {
        if (-not (Get-Command nvcc -ErrorAction SilentlyContinue)) { throw "nvcc not found: install the CUDA Toolkit" }
        $archs = if ($env:CUDA_ARCHS) { $env:CUDA_ARCHS } else { "75;80;86;89;90" }
        $env:CMAKE_ARGS = "-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$archs"
    } else {
        $env:CMAKE_ARGS = "-DGGML_NATIVE=OFF"
    }
    $env:FORCE_CMAKE = "1"
    Log "llama-cpp-python==0.3.36 with CMAKE_ARGS=$($env:CMAKE_ARGS)"
    $wheels = Join-Path $OutDir "wheels\$Backend"
    Remove-Item -Recurse -Force $wheels -ErrorAction SilentlyContinue
    Run $Python @("-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                  "-w", $wheels, "llama-cpp-python==0.3.36")
    $whl = Get-ChildItem $wheels -Filter "llama_cpp_python-*.whl" | Select-Object -First 1
    Run $Python @("-m", "pip", "install", "--no-deps", "--no-cache-dir", "--force-reinstall", $whl.FullName)
}

$Version = & $Python -c "import tomllib; print(tomllib.load(open(r'$Repo\pyproject.toml', 'rb'))['project']['version'])"
$Work = Join-Path ([System.IO.Path]::GetTempPath()) ("repomem-win-" + [guid]::NewGuid().ToString("N").Substring(0, 8))
New-Item -ItemType Directory -Force -Path "$Work\src", "$Work\stage" | Out-Null
try {
    # 2. Source snapshot (tracked + new, never ignored build products) and the repomem wheel.
    Log "source snapshot and repomem wheel"
    Push-Location $Repo
    $files = git ls-files --cached --others --exclude-standard
    Pop-Location
    foreach ($f in $files) {
        $src = Join-Path $Repo $f
        if (Test-Path $src -PathType Leaf) {
            $dst = Join-Path "$Work\src" $f
            New-Item -ItemType Directory -Force -Path (Split-Path -Parent $dst) | Out-Null
            Copy-Item $src $dst
        }
    }
    Run $Python @("-m", "pip", "wheel", "--no-deps", "-q", "-w", "$Work\wheel", "$Work\src")
    $rw = Get-ChildItem "$Work\wheel" -Filter "repomem-*.whl" | Select-Object -First 1
    Run $Python @("-m", "zipfile", "-e", $rw.FullName, "$Work\stage")

    # 3. Icon and bundle (repomem.exe: console CLI; repomem-gui.exe: windowed, for the Start menu).
    $svg = Join-Path $Repo "app\gui\icon.svg"
    if (-not (Test-Path $svg)) { $svg = Join-Path $Pkg "linux\repomem.svg" }
    Run $Python @((Join-Path $Pkg "render-icons.py"), "ico", $svg, "$Work\repomem.ico")
    $env:REPOMEM_STAGE = "$Work\stage"
    $env:REPOMEM_VERSION = $Version
    $env:REPOMEM_ICON = "$Work\repomem.ico"
    Push-Location $Work
    Run $Python @("-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN", "--distpath", "$Work\dist",
                  "--workpath", "$Work\pyi", (Join-Path $Pkg "repomem.spec"))
    Pop-Location
    $bundle = "$Work\dist\repomem"

    # 4. Self-check: the native extension, llama.cpp and (ggml-cpu.dll's) OpenMP runtime load.
    Log "self-check"
    $env:REPOMEM_HOME = "$Work\smoke"
    $env:REPOMEM_MODEL = "C:\nonexistent.gguf"
    $json = & "$bundle\repomem.exe" doctor --json | Out-String
    Remove-Item Env:\REPOMEM_MODEL, Env:\REPOMEM_HOME
    $doc = $json | ConvertFrom-Json
    if (-not $doc.native.loaded) { throw "repomem.native did not load: $($doc.native.error)" }
    if (-not $doc.gpu.backend) { throw "llama.cpp did not load: $($doc.gpu.system_info)" }
    if ($Backend -eq "cuda" -and $doc.gpu.backend -ne "CUDA") { throw "expected CUDA, got $($doc.gpu.backend)" }
    Log "native extension loaded; llama.cpp backend $($doc.gpu.backend)"

    # 5. Installer.
    $iscc = (Get-Command iscc -ErrorAction SilentlyContinue).Source
    if (-not $iscc) { $iscc = "${env:ProgramFiles(x86)}\Inno Setup 6\ISCC.exe" }
    if (-not (Test-Path $iscc)) { throw "Inno Setup 6 (ISCC.exe) not found" }
    $flavour = if ($Backend -eq "cuda") { "cuda" } else { "cpu" }
    Run $iscc @("/Q", "/DAppVersion=$Version", "/DSourceDir=$bundle", "/DOutputDir=$OutDir", "/DFlavour=$flavour",
                "/DIconFile=$Work\repomem.ico", (Join-Path $Here "repomem.iss"))
    $setup = Join-Path $OutDir "repomem-$Version-windows-x64-$flavour-setup.exe"
    Log ("bundle {0:N0} MB, installer {1:N0} MB" -f ((Get-ChildItem $bundle -Recurse | Measure-Object Length -Sum).Sum / 1MB),
         ((Get-Item $setup).Length / 1MB))
    Write-Output $setup
} finally {
    Remove-Item -Recurse -Force $Work -ErrorAction SilentlyContinue
}
